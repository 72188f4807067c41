//! ADD failures through the whole engine: git sources that cannot be fetched, a `--checksum`
//! that does not match what a real HTTP server (`python3 -m http.server` on loopback) serves,
//! and archives that try to leave the destination. Each build must fail with an error naming
//! the Dockerfile line and what was wrong, and write nothing outside the build's rootfs.

use std::path::Path;

use kiln_engine::{BuildOptions, Builder};
use kiln_sandbox::Mode;
use kiln_testkit::http::StaticServer;

fn options(context: &Path, kiln_dir: &Path, layout: &Path) -> BuildOptions {
    let mut options = BuildOptions::new(context.to_string_lossy());
    options.mode = Some(Mode::Chroot);
    options.kiln_dir = kiln_dir.to_path_buf();
    options.output.no_push = true;
    options.output.oci_layout_path = Some(layout.to_path_buf());
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_mismatch_fails_naming_url_and_digests_and_writes_no_image() {
    kiln_testkit::require_tools(&["python3"]);
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("payload.txt"), "payload\n").unwrap();
    let server = StaticServer::start(served.path());
    let url = format!("{}/payload.txt", server.url());
    let actual = kiln_oci::Digest::sha256_of(b"payload\n").to_string();
    let wrong = kiln_oci::Digest::sha256_of(b"not the payload").to_string();

    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM scratch\nADD --checksum={wrong} {url} /payload.txt\n"),
    )
    .unwrap();
    let kiln_dir = tempfile::tempdir().unwrap();
    let layout = kiln_dir.path().join("layout");
    let err = Builder::new(options(context.path(), kiln_dir.path(), &layout))
        .build()
        .await
        .expect_err("a checksum mismatch must fail the build")
        .to_string();
    for needle in ["Dockerfile:2", &url, &wrong, &actual] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    assert!(!layout.exists(), "a failed build wrote an image");

    // The right checksum builds.
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM scratch\nADD --checksum={actual} {url} /payload.txt\n"),
    )
    .unwrap();
    Builder::new(options(context.path(), kiln_dir.path(), &layout))
        .build()
        .await
        .expect("the matching checksum builds");
    assert!(layout.join("index.json").is_file());
}

/// A tar whose one entry is named `name` (written raw: the `tar` crate refuses such names).
fn hostile_tar(name: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(4);
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(b"evil");
    bytes.resize(512 * 2, 0);
    bytes.extend_from_slice(&[0u8; 1024]);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_climbing_out_of_the_destination_fail_the_build() {
    let context = tempfile::tempdir().unwrap();
    let escape = context.path().join("escaped");
    let name = format!("../../../../../../../../..{}", escape.display());
    std::fs::write(
        context.path().join("evil.tar"),
        hostile_tar(name.as_bytes()),
    )
    .unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM scratch\nADD evil.tar /dest/\n",
    )
    .unwrap();
    let err = failed_build(context.path()).await;
    assert!(err.contains("Dockerfile:2"), "{err}");
    assert!(err.contains("evil.tar"), "{err}");
    assert!(!escape.exists(), "the archive wrote outside the rootfs");
}

/// Builds `context`, which must fail without writing an image; returns the error.
async fn failed_build(context: &Path) -> String {
    let kiln_dir = tempfile::tempdir().unwrap();
    let layout = kiln_dir.path().join("layout");
    let err = Builder::new(options(context, kiln_dir.path(), &layout))
        .build()
        .await
        .expect_err("the build must fail")
        .to_string();
    assert!(!layout.exists(), "a failed build wrote an image");
    err
}

/// A git source that cannot be fetched (no repository there, or a ref it lacks), or that is
/// given a `--checksum`, fails the build at its line and writes no image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_source_that_cannot_be_fetched_fails_at_its_line() {
    use kiln_testkit::git::{git, Daemon};
    kiln_testkit::require_tools(&["git"]);
    let work = tempfile::tempdir().unwrap();
    let served = work.path().join("served");
    let repo = work.path().join("repo");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("a.txt"), "a\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    git(
        work.path(),
        &["clone", "-q", "--bare", "repo", "served/app.git"],
    );
    let daemon = Daemon::start(&served);
    let checksum = kiln_oci::Digest::sha256_of(b"x").to_string();
    for (add, needles) in [
        (
            format!("ADD {} /src", daemon.url("missing.git")),
            vec!["Dockerfile:2", "missing.git", "ls-remote"],
        ),
        (
            format!("ADD {}#no-such-tag /src", daemon.url("app.git")),
            vec!["Dockerfile:2", "no ref \"no-such-tag\""],
        ),
        (
            format!("ADD --checksum={checksum} {} /src", daemon.url("app.git")),
            vec!["Dockerfile:2", "--checksum"],
        ),
    ] {
        let context = tempfile::tempdir().unwrap();
        std::fs::write(
            context.path().join("Dockerfile"),
            format!("FROM scratch\n{add}\n"),
        )
        .unwrap();
        let err = failed_build(context.path()).await;
        for needle in needles {
            assert!(err.contains(needle), "{add}: {needle} missing from: {err}");
        }
    }
}

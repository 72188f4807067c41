//! A full disk, with the real `executor` binary against a real loopback registry: the kiln dir
//! is a tmpfs of a few MB mounted by the test. When the base image does not fit, and when a
//! RUN's layer does not fit, the build fails with an error that names the phase and the path
//! on the full filesystem, and nothing is tagged.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_testkit::{bases, image, Registry};

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "kiln-full-disk",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs of {size}");
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(self.dir.path())
            .status();
    }
}

/// Builds `dockerfile` with the kiln dir on `disk`, pushing to `destination`.
fn build(disk: &SmallDisk, dockerfile: &str, destination: &str) -> (Output, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
    let digest_file = disk.path().with_extension("digest");
    let output = Command::new(env!("CARGO_BIN_EXE_executor"))
        .arg(format!("--context=dir://{}", context.display()))
        .arg(format!("--destination={destination}"))
        .arg(format!("--kiln-dir={}", disk.path().display()))
        .arg(format!("--digest-file={}", digest_file.display()))
        .args(["--mode=chroot", "--progress=plain"])
        // The stage's writes on the small disk too, as the RUN's `df /` then says: on the
        // upper-dir tmpfs they would be bounded by memory, not by this disk.
        .arg("--upper-tmpfs=false")
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .output()
        .expect("run executor");
    (output, digest_file)
}

fn manifest_puts(registry: &Registry, repo: &str) -> usize {
    let prefix = format!("/v2/{repo}/manifests/");
    registry
        .requests()
        .iter()
        .filter(|(method, uri)| method == "PUT" && uri.starts_with(&prefix))
        .count()
}

/// The error line, checked for the phase, the full filesystem's path and the cause.
fn assert_full_disk_error(output: &Output, phase: &str, disk: &SmallDisk) -> String {
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_ne!(output.status.code(), Some(0), "{err}");
    let line = err
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{err}"))
        .to_owned();
    assert!(line.contains(phase), "the error names {phase:?}: {line}");
    assert!(
        line.contains(&disk.path().display().to_string()),
        "the error names the full filesystem's path: {line}"
    );
    assert!(line.contains("No space left on device"), "{line}");
    line
}

fn start_registry() -> Registry {
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "mount", "umount"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    registry
}

/// The base's one layer is about 1 MB compressed and 2 MB unpacked: on a 2 MB disk the
/// download fits and the unpack does not.
#[test]
fn a_base_that_does_not_fit_names_the_unpack_and_the_path() {
    let registry = start_registry();
    let addr = registry.addr();
    let disk = SmallDisk::mount("2m");
    let (output, digest_file) = build(
        &disk,
        &format!("FROM {addr}/base/busybox:latest\nRUN echo never > /never\n"),
        &format!("{addr}/out/full-base:1"),
    );
    let line = assert_full_disk_error(&output, "unpacking base layer sha256:", &disk);
    eprintln!("{line}");
    assert_eq!(
        manifest_puts(&registry, "out/full-base"),
        0,
        "a tag was pushed"
    );
    assert!(!digest_file.exists());
}

/// The RUN fills most of what is free with bytes that do not compress; the step succeeds, and
/// its layer, written to the blob store on the same disk, does not fit.
#[test]
fn a_layer_that_does_not_fit_names_the_step_and_the_blob_store() {
    let registry = start_registry();
    let addr = registry.addr();
    let disk = SmallDisk::mount("12m");
    let dockerfile = format!(
        "FROM {addr}/base/busybox:latest\n\
         RUN free=$(df -k / | awk 'NR==2 {{print $4}}') && \
             head -c $((free * 1024 * 6 / 10)) /dev/urandom > /big && echo wrote\n"
    );
    let (output, digest_file) = build(&disk, &dockerfile, &format!("{addr}/out/full-layer:1"));
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(err.contains("| wrote"), "the RUN itself succeeds: {err}");
    let line = assert_full_disk_error(&output, "writing layer of step 0 to", &disk);
    assert!(line.contains("/blobs"), "{line}");
    eprintln!("{line}");
    assert_eq!(
        manifest_puts(&registry, "out/full-layer"),
        0,
        "a tag was pushed"
    );
    assert!(!digest_file.exists());
}

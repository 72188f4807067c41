//! Paths are ignored only where they are real. In chroot mode the stage's rootfs is its own,
//! so an image may have `/kiln` and `/kaniko`: `executor/Containerfile` (which puts the executor
//! there) builds, where Kiln used to leave both out of the layer without a word. In place, only
//! the Kiln dir in use (with `/kaniko`, its link in Kiln's image) is left alone, and a COPY or a
//! base layer that writes there gets a warning naming the paths; with another Kiln dir an image
//! can have both.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{bases, image, require_tools, run, Registry};

mod support;
use support::pod::{container_rootfs, install_executor, runc_run, write_bundle_config, Bind};

fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The files of an image unpacked by umoci from the OCI layout at `layout`.
fn unpack(layout: &Path, into: &Path) -> std::path::PathBuf {
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(into));
    into.join("rootfs")
}

#[test]
fn chroot_mode_builds_the_containerfile_with_kiln_and_kaniko_in_the_image() {
    require_tools(&["umoci"]);
    let work = tempfile::tempdir().unwrap();
    // The context image-context.sh makes, with a stand-in executor (the real one is built by
    // scripts/executor-image; the layout is what matters here).
    let context = work.path().join("context");
    let rootfs = context.join("rootfs");
    for dir in [
        "kiln/ssl/certs",
        "kiln/.docker",
        "kiln/lifecycle",
        "workspace",
        "tmp",
        "root",
    ] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::write(rootfs.join("kiln/executor"), "#!/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("kiln/lifecycle/launcher"), "launcher").unwrap();
    std::fs::write(rootfs.join("kiln/ssl/certs/ca-certificates.crt"), "certs").unwrap();
    std::os::unix::fs::symlink("kiln", rootfs.join("kaniko")).unwrap();
    std::fs::copy(
        repo_root().join("executor/Containerfile"),
        context.join("Containerfile"),
    )
    .unwrap();
    let layout = work.path().join("layout");
    let out = Command::new(env!("CARGO_BIN_EXE_executor"))
        .arg(format!("--context=dir://{}", context.display()))
        .args(["--dockerfile=Containerfile", "--no-push", "--mode=chroot"])
        .arg(format!("--oci-layout-path={}", layout.display()))
        .arg(format!("--kiln-dir={}", work.path().join("kiln").display()))
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let image = unpack(&layout, &work.path().join("unpacked"));
    for file in [
        "kiln/executor",
        "kiln/lifecycle/launcher",
        "kiln/ssl/certs/ca-certificates.crt",
    ] {
        assert!(
            image.join(file).is_file(),
            "/{file} is not in the image:\n{log}"
        );
    }
    assert!(image.join("kiln/.docker").is_dir(), "{log}");
    assert_eq!(
        std::fs::read_link(image.join("kaniko")).unwrap(),
        Path::new("kiln")
    );
    assert!(!log.contains("warning"), "{log}");
}

/// One in-place build in a fresh runc container laid out as Kiln's image (busybox base, the
/// executor in `/kiln`, `/kaniko -> kiln`), Docker's default capabilities; its log.
fn build_in_place(work: &Path, name: &str, context: &Path, args: &[String]) -> String {
    let bundle = work.join(format!("bundle-{name}"));
    let rootfs = container_rootfs(&bundle);
    let mut argv = install_executor(&rootfs);
    argv.extend([
        "--context=dir:///workspace/context".to_owned(),
        "--mode=in-place".to_owned(),
        "--progress=plain".to_owned(),
    ]);
    argv.extend_from_slice(args);
    let volume = work.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let binds = [
        Bind(context, "/workspace/context", "ro"),
        Bind(&volume, "/cache-volume", "rw"),
    ];
    write_bundle_config(&bundle, &argv, &binds, &[]);
    let out = runc_run(
        &bundle,
        &format!("kiln-ignore-{name}-{}", std::process::id()),
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name}: build failed:\n{log}");
    log
}

#[test]
fn in_place_leaves_out_only_the_kiln_dir_in_use_and_says_so() {
    require_tools(&["runc", "docker-registry", "skopeo", "umoci", "ldd"]);
    let registry = Registry::start();
    let addr = registry.addr();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    for dir in ["tree/kiln", "tree/kaniko", "tree/opt"] {
        std::fs::create_dir_all(context.join(dir)).unwrap();
    }
    for file in [
        "tree/kiln/planted.txt",
        "tree/kaniko/planted.txt",
        "tree/opt/app.txt",
    ] {
        std::fs::write(context.join(file), file).unwrap();
    }
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {addr}/library/busybox:latest\nCOPY tree/ /\n"),
    )
    .unwrap();

    // The default Kiln dir: /kiln and its link /kaniko stay Kiln's, and the COPY says what it
    // did not write.
    let log = build_in_place(
        work.path(),
        "default",
        &context,
        &[format!("--destination={addr}/ignore:default")],
    );
    assert!(
        log.contains("did not write /kaniko/planted.txt inside /kaniko")
            && log.contains("/kiln/planted.txt inside /kiln (Kiln's own directory"),
        "{log}"
    );
    let flat = image::flatten(&registry, "ignore:default");
    assert!(flat.rootfs.join("opt/app.txt").is_file(), "{log}");
    assert!(!flat.rootfs.join("kiln").exists() && !flat.rootfs.join("kaniko").exists());

    // Another Kiln dir: nothing named /kiln or /kaniko is special.
    let log = build_in_place(
        work.path(),
        "other-dir",
        &context,
        &[
            format!("--destination={addr}/ignore:other-dir"),
            "--kaniko-dir=/var/kiln-work".to_owned(),
        ],
    );
    assert!(!log.contains("did not write"), "{log}");
    let flat = image::flatten(&registry, "ignore:other-dir");
    for file in ["kiln/planted.txt", "kaniko/planted.txt", "opt/app.txt"] {
        assert!(flat.rootfs.join(file).is_file(), "/{file}:\n{log}");
    }

    // That image as a base, in place with the default Kiln dir: its /kiln files are not
    // unpacked over Kiln's, with a warning; its layers stay in the image unchanged.
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {addr}/ignore:other-dir\nRUN cat /opt/app.txt > /seen\n"),
    )
    .unwrap();
    let log = build_in_place(
        work.path(),
        "base",
        &context,
        &[format!("--destination={addr}/ignore:base")],
    );
    assert!(
        log.contains("the layers unpacked hold /kiln/planted.txt inside /kiln"),
        "{log}"
    );
    let flat = image::flatten(&registry, "ignore:base");
    assert!(flat.rootfs.join("kiln/planted.txt").is_file(), "{log}");
    assert!(flat.rootfs.join("seen").is_file(), "{log}");
}

//! The fixtures themselves work: a registry accepts a pushed base and skopeo reads it back.

use std::process::Command;

use kiln_testkit::{bases, image, run, Registry};

#[test]
fn busybox_base_pushes_and_inspects() {
    let registry = Registry::start();
    let rootfs = bases::busybox_rootfs();
    assert!(rootfs.join("bin/sh").symlink_metadata().is_ok());
    let digest = image::push_rootfs(&registry, rootfs, "base/busybox:1");
    assert!(digest.starts_with("sha256:"), "{digest}");
    let inspect = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{}/base/busybox:1", registry.addr())));
    assert_eq!(inspect.trim(), digest, "registry log:\n{}", registry.log());
}

#[test]
fn debian_base_is_complete() {
    let rootfs = bases::debian_rootfs();
    assert!(rootfs.join("usr/bin/apt-get").is_file());
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("kiln:x:1000:1000"));
    let layout = bases::debian_layout();
    assert!(layout.join("index.json").is_file());
}

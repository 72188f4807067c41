//! Kiln's own image, built by Kiln from `executor/Containerfile` with `scripts/executor-image`:
//! the layout kaniko users expect, a static executor, the same digest when rebuilt from the
//! same commit, its size, and how soon a build in it says something.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use kiln_testkit::kiln_image::{kiln_image, layout_digest, repo_root, KilnImage};
use kiln_testkit::run;

mod support;
use support::podman::Podman;

/// The image's manifest and config, read from its OCI layout.
fn manifest_and_config(image: &KilnImage) -> (serde_json::Value, serde_json::Value) {
    let read = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let blob = image.layout.join("blobs/sha256").join(hex);
        serde_json::from_slice(&std::fs::read(blob).unwrap()).unwrap()
    };
    let manifest = read(&image.digest);
    let config = read(manifest["config"]["digest"].as_str().unwrap());
    (manifest, config)
}

/// Unpacks the image with umoci (independent of Kiln) into `dir`; its rootfs.
fn unpack(image: &KilnImage, dir: &Path) -> std::path::PathBuf {
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", image.layout.display()))
        .arg(dir.join("bundle")));
    dir.join("bundle/rootfs")
}

#[test]
fn kiln_builds_its_own_image_with_the_kaniko_layout_and_the_same_digest_again() {
    kiln_testkit::require_tools(&["umoci", "readelf"]);
    let image = kiln_image(false);
    let dir = tempfile::tempdir().unwrap();
    let rootfs = unpack(image, dir.path());
    let elf = run(Command::new("readelf")
        .arg("-l")
        .arg(rootfs.join("kiln/executor")));
    assert!(
        !elf.contains("program interpreter"),
        "the executor is not static"
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("kaniko")).unwrap(),
        Path::new("kiln")
    );
    for file in [
        "kaniko/executor",
        "kaniko/lifecycle/kiln-lifecycle",
        "kaniko/lifecycle/launcher",
        "kaniko/ssl/certs/ca-certificates.crt",
    ] {
        assert!(rootfs.join(file).is_file(), "{file} missing");
    }
    for directory in ["kaniko/.docker", "workspace", "tmp", "root"] {
        assert!(rootfs.join(directory).is_dir(), "{directory} missing");
    }
    let tmp_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(rootfs.join("tmp")).unwrap().permissions(),
    );
    assert_eq!(tmp_mode & 0o7777, 0o1777);
    assert!(!rootfs.join("busybox").exists());

    let (manifest, config) = manifest_and_config(image);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/kiln/executor"])
    );
    assert_eq!(config["config"]["WorkingDir"], "/workspace");
    let env = config["config"]["Env"].to_string();
    for var in [
        "DOCKER_CONFIG=/kiln/.docker/",
        "SSL_CERT_DIR=/kiln/ssl/certs",
        "HOME=/root",
    ] {
        assert!(env.contains(var), "{var} not in {env}");
    }
    let compressed: u64 = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    eprintln!(
        "Kiln's image {}: {:.1} MB compressed",
        image.digest,
        compressed as f64 / 1e6
    );
    if !rootfs.join("kiln/buildpacks").exists() {
        assert!(compressed < 25_000_000, "{compressed} bytes compressed");
    }

    // The same commit again, from a context made anew: the same image, to the digest.
    let again = tempfile::tempdir().unwrap();
    let context = again.path().join("context");
    run(Command::new(repo_root().join("executor/image-context.sh")).arg(&context));
    run(Command::new(repo_root().join("scripts/executor-image"))
        .arg("--no-push")
        .arg(format!(
            "--oci-layout-path={}",
            again.path().join("layout").display()
        ))
        .env("KILN_IMAGE_CONTEXT", &context)
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test"));
    let rebuilt = KilnImage {
        layout: again.path().join("layout"),
        digest: layout_digest(&again.path().join("layout")),
        context,
    };
    let (first_manifest, _) = manifest_and_config(image);
    let (rebuilt_manifest, rebuilt_config) = manifest_and_config(&rebuilt);
    assert_eq!(rebuilt_manifest["config"], first_manifest["config"]);
    assert_eq!(
        rebuilt_config["rootfs"], config["rootfs"],
        "the layers' diff_ids"
    );
    assert_eq!(
        rebuilt_manifest["layers"], first_manifest["layers"],
        "the compressed layers"
    );
    assert_eq!(rebuilt.digest, image.digest, "the manifest digest");
}

#[test]
fn the_debug_image_adds_busybox_and_a_build_in_it_speaks_at_once() {
    kiln_testkit::require_tools(&["umoci"]);
    let image = kiln_image(true);
    let dir = tempfile::tempdir().unwrap();
    let rootfs = unpack(image, dir.path());
    for applet in ["busybox", "sh", "cat", "sleep"] {
        assert!(
            rootfs.join("busybox").join(applet).exists(),
            "/busybox/{applet}"
        );
    }
    assert_ne!(image.digest, kiln_image(false).digest);

    // Time to the first log line of a build, from `podman run` (container made and started)
    // and from the image's executor started directly, which is what the image adds nothing to.
    let podman = Podman::new();
    podman.load(image, "localhost/kiln/executor:debug");
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("Dockerfile"), "FROM scratch\nENV A=1\n").unwrap();
    let mut in_podman = podman.cmd();
    in_podman
        .args(["run", "--rm", "--network=host"])
        .arg(format!(
            "--volume={}:/workspace:ro",
            context.path().display()
        ));
    in_podman.args([
        "localhost/kiln/executor:debug",
        "--no-push",
        "--progress=plain",
    ]);
    let podman_first = first_line_after(&mut in_podman);
    let mut direct = Command::new(rootfs.join("kiln/executor"));
    // Not podman's environment: podman reads DOCKER_CONFIG too.
    direct
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .arg(format!("--context={}", context.path().display()))
        .args(["--no-push", "--progress=plain", "--mode=chroot"])
        .arg(format!("--kiln-dir={}", dir.path().join("kiln").display()));
    let direct_first = first_line_after(&mut direct);
    eprintln!(
        "first log line: {:.0} ms after `podman run`, {:.0} ms after starting the executor",
        podman_first * 1e3,
        direct_first * 1e3
    );
}

/// Seconds from starting `command` to its first line on stderr; the command must then succeed.
fn first_line_after(command: &mut Command) -> f64 {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a log line").unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{first}\n{}", rest.join("\n"));
    elapsed
}

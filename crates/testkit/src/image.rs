//! One-layer OCI images of a directory, written with the system `tar` and `gzip` (independent of
//! Kiln's own layer writer, so they can serve as reference inputs) and pushed with skopeo.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::{require_tools, run, Registry};

/// Writes an OCI image layout at `layout_dir` holding one image tagged `tag`: a single gzip layer
/// of everything under `rootfs` (numeric owners, xattrs kept), and a linux/amd64 config with the
/// default PATH. Returns the manifest digest (`sha256:...`).
pub fn oci_layout_from_rootfs(rootfs: &Path, layout_dir: &Path, tag: &str) -> String {
    oci_layout_with_env(rootfs, layout_dir, tag, &[])
}

/// [`oci_layout_from_rootfs`] with `env` (`NAME=VALUE`) in the config after the default PATH
/// (a `PATH=` of its own replaces it).
pub fn oci_layout_with_env(rootfs: &Path, layout_dir: &Path, tag: &str, env: &[&str]) -> String {
    require_tools(&["tar", "gzip"]);
    let blobs = layout_dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();

    let tmp_layer = layout_dir.join("layer.tmp");
    let mut tar = Command::new("tar")
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            "-C",
        ])
        .arg(rootfs)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn tar");
    let mut gzip = Command::new("gzip")
        .args(["-n", "-1"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&tmp_layer).unwrap())
        .spawn()
        .expect("spawn gzip");
    let mut diff_id = Sha256::new();
    {
        let mut from_tar = tar.stdout.take().unwrap();
        let mut to_gzip = gzip.stdin.take().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = from_tar.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            diff_id.update(&buf[..n]);
            to_gzip.write_all(&buf[..n]).unwrap();
        }
    }
    assert!(
        tar.wait().unwrap().success(),
        "tar of {} failed",
        rootfs.display()
    );
    assert!(gzip.wait().unwrap().success(), "gzip failed");
    let diff_id = format!("sha256:{}", hex::encode(diff_id.finalize()));
    let (layer_digest, layer_size) = file_digest(&tmp_layer);
    std::fs::rename(&tmp_layer, blobs.join(&layer_digest[7..])).unwrap();

    let mut config_env = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"];
    if env.iter().any(|e| e.starts_with("PATH=")) {
        config_env.clear();
    }
    config_env.extend_from_slice(env);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": config_env},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": format!("kiln-testkit: tar of {}", rootfs.display())}],
    });
    let (config_digest, config_size) = write_blob(&blobs, &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) =
        write_blob(&blobs, &serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(
        layout_dir.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout_dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    manifest_digest
}

/// Copies the image tagged `tag` in an OCI layout to `registry` as `repo_tag` (`repo:tag`) with
/// skopeo, returning the manifest digest the registry stored.
pub fn push_layout(registry: &Registry, layout_dir: &Path, tag: &str, repo_tag: &str) -> String {
    require_tools(&["skopeo"]);
    let digest_file = tempfile::NamedTempFile::new().unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
        .arg(digest_file.path())
        .arg(format!("oci:{}:{tag}", layout_dir.display()))
        .arg(format!("docker://{}/{repo_tag}", registry.addr())));
    std::fs::read_to_string(digest_file.path())
        .unwrap()
        .trim()
        .to_owned()
}

/// Pushes a one-layer image of `rootfs` to `registry` as `repo_tag`; returns the manifest digest.
/// The cached bases have ready layouts, so `push_rootfs(&r, bases::debian_rootfs(), ..)` costs
/// only the upload.
pub fn push_rootfs(registry: &Registry, rootfs: &Path, repo_tag: &str) -> String {
    let cache = crate::cache_dir();
    if rootfs == cache.join("busybox-rootfs") {
        return push_layout(registry, crate::bases::busybox_layout(), "latest", repo_tag);
    }
    if rootfs == cache.join("debian-rootfs") {
        return push_layout(registry, crate::bases::debian_layout(), "latest", repo_tag);
    }
    let layout = tempfile::tempdir().unwrap();
    oci_layout_from_rootfs(rootfs, layout.path(), "latest");
    push_layout(registry, layout.path(), "latest", repo_tag)
}

fn file_digest(path: &Path) -> (String, u64) {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher).unwrap();
    (format!("sha256:{}", hex::encode(hasher.finalize())), size)
}

fn write_blob(blobs: &Path, data: &[u8]) -> (String, u64) {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    std::fs::write(blobs.join(&digest[7..]), data).unwrap();
    (digest, data.len() as u64)
}

/// An image pulled back from a registry for inspection: its flattened root filesystem (made by
/// skopeo + umoci, independent of Kiln) and its raw config JSON exactly as the registry stores it.
pub struct Flattened {
    /// The unpacked root filesystem, as a runtime would see it.
    pub rootfs: std::path::PathBuf,
    /// The image config document.
    pub config: serde_json::Value,
    /// The runnable bundle directory umoci made (`rootfs/` plus `config.json` for runc).
    pub bundle: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Pulls `repo_tag` from `registry` with skopeo and unpacks it with umoci.
pub fn flatten(registry: &Registry, repo_tag: &str) -> Flattened {
    require_tools(&["skopeo", "umoci"]);
    let dir = tempfile::Builder::new()
        .prefix("kiln-flat-")
        .tempdir()
        .unwrap();
    let source = format!("docker://{}/{repo_tag}", registry.addr());
    let layout = dir.path().join("layout");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false", &source])
        .arg(format!("oci:{}:img", layout.display())));
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:img", layout.display()))
        .arg(&bundle));
    // skopeo's oci: copy drops Healthcheck/OnBuild/Shell, so read the config straight from the registry.
    let raw = run(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &source,
    ]));
    let config = serde_json::from_str(&raw).expect("image config is JSON");
    Flattened {
        rootfs: bundle.join("rootfs"),
        config,
        bundle,
        _dir: dir,
    }
}

/// Runs a flattened image's default command with runc (as a container runtime would) and
/// returns its stdout; panics with stderr if it fails.
pub fn run_with_runc(flat: &Flattened) -> String {
    require_tools(&["runc"]);
    let config_path = flat.bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["process"]["terminal"] = serde_json::Value::Bool(false);
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let name = format!(
        "kiln-test-{}-{}",
        std::process::id(),
        flat.bundle.display().to_string().len()
            + std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as usize
    );
    let out = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&flat.bundle)
        .arg(&name)
        .stdin(Stdio::null())
        .output()
        .expect("spawn runc");
    let _ = Command::new("runc")
        .args(["delete", "--force", &name])
        .output();
    assert!(
        out.status.success(),
        "runc run failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The blobs of `repo_tag` (every layer, raw and gunzipped, and the config) that contain
/// `needle`, by file name (the digest's hex), for checks that a secret never reached an image.
pub fn blobs_containing(registry: &Registry, repo_tag: &str, needle: &[u8]) -> Vec<String> {
    require_tools(&["skopeo", "gzip"]);
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{}/{repo_tag}", registry.addr()))
        .arg(format!("dir:{}", dir.path().display())));
    let found = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let blob = entry.unwrap().path();
        let raw = std::fs::read(&blob).unwrap();
        let unzipped = Command::new("gzip").arg("-dc").arg(&blob).output().unwrap();
        if found(&raw) || (unzipped.status.success() && found(&unzipped.stdout)) {
            hits.push(blob.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    hits.sort();
    hits
}

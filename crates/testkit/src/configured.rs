//! Base images that share the cached busybox layer but carry configs of their own, the way
//! bases made by other tools differ: a registry image with a full Docker config, an image with
//! no `Env` at all (as `buildah from scratch` + `commit` or `umoci` leave it), one whose config
//! sets `User`, `WorkingDir` and `Volumes`, and one with `ONBUILD` triggers.
//!
//! Each is written as a `dir:` image (the cached layer blob, a config and a manifest made here)
//! and pushed with skopeo, so Docker-format bases keep the fields (OnBuild, Healthcheck) that an
//! OCI config cannot carry. Nothing here needs building per machine beyond the busybox layout.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{require_tools, run, Registry};

/// The manifest and config media types a base is pushed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    /// OCI image manifest and config.
    Oci,
    /// Docker image manifest v2 schema 2 and the Docker container config, as Docker Hub serves.
    Docker,
}

/// One configured base: its repository name (`library/NAME:latest`, so `FROM NAME` finds it
/// through the docker.io mapping) and the `config` object of its image config.
#[derive(Debug, Clone)]
pub struct ConfiguredBase {
    /// The short name a Dockerfile uses in `FROM`.
    pub name: &'static str,
    /// How the image is pushed.
    pub format: ConfigFormat,
    /// The image config's `config` object.
    pub config: Value,
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The bases the conformance cases build on besides plain `busybox` and `debian:bookworm`.
pub fn configured_bases() -> Vec<ConfiguredBase> {
    vec![
        ConfiguredBase {
            name: "base-full",
            format: ConfigFormat::Docker,
            config: json!({
                "Env": [DEFAULT_PATH, "LANG=C.UTF-8", "APP_HOME=/srv/app", "GREETING=from base"],
                "Cmd": ["sh"],
                "WorkingDir": "/",
                "Labels": {"org.example.vendor": "kiln-test", "org.example.role": "base"},
                "ExposedPorts": {"8080/tcp": {}},
                "StopSignal": "SIGQUIT",
            }),
        },
        ConfiguredBase {
            name: "base-noenv",
            format: ConfigFormat::Oci,
            config: json!({}),
        },
        ConfiguredBase {
            name: "base-user",
            format: ConfigFormat::Oci,
            config: json!({
                "Env": [DEFAULT_PATH],
                "User": "kiln",
                "WorkingDir": "/home/kiln/app",
                "Volumes": {"/data": {}},
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["id"],
            }),
        },
        ConfiguredBase {
            name: "base-onbuild",
            format: ConfigFormat::Docker,
            config: json!({
                "Env": [DEFAULT_PATH],
                "OnBuild": [
                    "RUN echo \"image trigger ran in $(pwd)\" > /image-trigger.txt",
                    "ENV FROM_TRIGGER=image",
                    "COPY trigger.txt /from-trigger.txt",
                ],
            }),
        },
    ]
}

/// Pushes every configured base to `registry` as `library/NAME:latest`.
pub fn push_configured_bases(registry: &Registry) {
    for base in configured_bases() {
        push_configured(registry, &base, &format!("library/{}:latest", base.name));
    }
}

/// Pushes the busybox layer with `base`'s config to `registry` as `repo_tag`; returns the
/// manifest digest.
pub fn push_configured(registry: &Registry, base: &ConfiguredBase, repo_tag: &str) -> String {
    require_tools(&["skopeo"]);
    let layout = crate::bases::busybox_layout();
    let (layer, diff_id) = layer_of(layout);
    let dir = tempfile::tempdir().unwrap();
    let layer_hex = layer["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    std::fs::copy(
        layout.join("blobs/sha256").join(layer_hex),
        dir.path().join(layer_hex),
    )
    .unwrap();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": base.config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": format!("kiln-testkit: configured base {}", base.name)}],
    });
    let (config_type, manifest_type, layer_type) = match base.format {
        ConfigFormat::Oci => (
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        ConfigFormat::Docker => (
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    };
    let (config_digest, config_size) =
        write_blob(dir.path(), &serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": layer_type, "digest": layer["digest"], "size": layer["size"]}],
    });
    std::fs::write(
        dir.path().join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("version"),
        "Directory Transport Version: 1.1\n",
    )
    .unwrap();
    let digest_file = tempfile::NamedTempFile::new().unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
        .arg(digest_file.path())
        .arg(format!("dir:{}", dir.path().display()))
        .arg(format!("docker://{}/{repo_tag}", registry.addr())));
    std::fs::read_to_string(digest_file.path())
        .unwrap()
        .trim()
        .to_owned()
}

/// The layer descriptor and diff ID of the one-layer image tagged `latest` in `layout`.
fn layer_of(layout: &Path) -> (Value, String) {
    let read = |digest: &str| -> Value {
        let path = layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let config = read(manifest["config"]["digest"].as_str().unwrap());
    let diff_id = config["rootfs"]["diff_ids"][0].as_str().unwrap().to_owned();
    (manifest["layers"][0].clone(), diff_id)
}

fn write_blob(dir: &Path, data: &[u8]) -> (String, u64) {
    let hex = hex::encode(Sha256::digest(data));
    std::fs::write(dir.join(&hex), data).unwrap();
    (format!("sha256:{hex}"), data.len() as u64)
}

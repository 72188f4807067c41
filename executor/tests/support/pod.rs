//! Running `executor` inside a runc container laid out as Kiln's image, as a Pod would run it:
//! Docker's default capabilities (plus what a test adds), the host's network, the build context
//! and volumes bind-mounted.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_testkit::hostile::DOCKER_DEFAULT_CAPS;
use kiln_testkit::{bases, run};

/// Lays out Kiln's image (executor/Containerfile): the executor in `/kiln` and `/kaniko` a
/// symlink to it, with the shared libraries it needs (and their loader) under `/kiln/lib` when
/// it is not static; returns the argv prefix that starts it as `/kaniko/executor`. The
/// libraries live under the Kiln dir so the build's wipe of `/` spares them.
pub fn install_executor(rootfs: &Path) -> Vec<String> {
    let binary = env!("CARGO_BIN_EXE_executor");
    let kaniko = rootfs.join("kiln");
    std::os::unix::fs::symlink("kiln", rootfs.join("kaniko")).unwrap();
    std::fs::create_dir_all(kaniko.join("lib")).unwrap();
    std::fs::copy(binary, kaniko.join("executor")).unwrap();
    let ldd = Command::new("ldd").arg(binary).output().unwrap();
    let listing = String::from_utf8_lossy(&ldd.stdout).into_owned();
    let mut loader = None;
    for line in listing.lines() {
        let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) else {
            continue;
        };
        let name = Path::new(path).file_name().unwrap();
        std::fs::copy(path, kaniko.join("lib").join(name)).unwrap();
        if name.to_string_lossy().starts_with("ld-linux") {
            loader = Some(format!("/kaniko/lib/{}", name.to_string_lossy()));
        }
    }
    match loader {
        Some(loader) => vec![
            loader,
            "--library-path".into(),
            "/kaniko/lib".into(),
            "/kaniko/executor".into(),
        ],
        None => vec!["/kaniko/executor".into()],
    }
}

/// The rootfs of a container in `bundle`: a copy of the busybox base with the mount points of
/// the context and the volume [`write_config`] mounts.
pub fn container_rootfs(bundle: &Path) -> PathBuf {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(bundle).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(bases::busybox_rootfs())
        .arg(&rootfs));
    std::fs::create_dir_all(rootfs.join("workspace/context")).unwrap();
    std::fs::create_dir_all(rootfs.join("cache-volume")).unwrap();
    rootfs
}

/// A bind mount of the container: host path, path in the container, `ro` or `rw`.
pub struct Bind<'a>(pub &'a Path, pub &'a str, pub &'a str);

/// A runc bundle for the container: host network, Docker's capabilities and `extra_caps`, the
/// binds, `args` as the process.
pub fn write_bundle_config(
    bundle: &Path,
    args: &[String],
    binds: &[Bind<'_>],
    extra_caps: &[&str],
) {
    run(Command::new("runc").arg("spec").current_dir(bundle));
    let path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = args.into();
    config["process"]["cwd"] = "/kaniko".into();
    let caps: Vec<serde_json::Value> = (DOCKER_DEFAULT_CAPS.iter().chain(extra_caps))
        .map(|c| (*c).into())
        .collect();
    for set in ["bounding", "effective", "permitted"] {
        config["process"]["capabilities"][set] = caps.clone().into();
    }
    config["root"]["readonly"] = false.into();
    let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
    namespaces.retain(|ns| ns["type"] != "network");
    let mounts = config["mounts"].as_array_mut().unwrap();
    for Bind(source, target, mode) in binds {
        mounts.push(serde_json::json!({
            "destination": target,
            "type": "bind",
            "source": source,
            "options": ["rbind", mode],
        }));
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// Runs the bundle's container to its end and removes it; its output and exit status.
pub fn runc_run(bundle: &Path, name: &str) -> Output {
    let out = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(name)
        .stdin(Stdio::null())
        .output()
        .expect("spawn runc");
    let _ = Command::new("runc")
        .args(["delete", "--force", name])
        .output();
    out
}

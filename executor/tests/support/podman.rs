//! podman with a storage of its own per test (vfs, as the machines need), for running Kiln's
//! image as a Pod would: `podman kube play` for Pod YAML, `podman run`/`exec` otherwise. Every
//! container gets podman's default capabilities and seccomp profile, never more.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::kiln_image::KilnImage;

/// A podman whose images, containers and state live in a temporary directory.
pub struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    /// A fresh, empty podman.
    pub fn new() -> Podman {
        kiln_testkit::require_tools(&["podman", "runc", "catatonit"]);
        Podman {
            dir: tempfile::Builder::new()
                .prefix("kiln-podman-")
                .tempdir_in("/var/tmp")
                .unwrap(),
        }
    }

    /// `podman` with this instance's storage.
    pub fn cmd(&self) -> Command {
        let dir = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(dir.join("root"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .arg("--tmpdir")
            .arg(dir.join("tmp"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `podman ARGS`, panicking with its output when it fails; its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `podman ARGS` and returns what it did, for commands that are expected to fail or
    /// whose output is the point.
    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Loads Kiln's image from its OCI layout and names it `name`, as a cluster's nodes would
    /// pull it from a registry.
    pub fn load(&self, image: &KilnImage, name: &str) {
        let source = format!("oci:{}:latest", image.layout.display());
        let id = self.run(&["pull", "-q", &source]);
        self.run(&["tag", id.trim(), name]);
    }

    /// `podman kube play` of `yaml` (JSON is YAML too), kept in `dir`.
    pub fn kube_play(&self, dir: &Path, yaml: &serde_json::Value) {
        let file = dir.join("kube.yaml");
        std::fs::write(&file, serde_json::to_vec_pretty(yaml).unwrap()).unwrap();
        self.run(&["kube", "play", &file.to_string_lossy()]);
    }

    /// Waits for container `name` to exit (at most `limit`); its exit code.
    pub fn wait(&self, name: &str, limit: Duration) -> i32 {
        let started = Instant::now();
        loop {
            let out = self.output(&[
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.ExitCode}}",
                name,
            ]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut fields = text.split_whitespace();
            if let (Some("exited" | "stopped"), Some(code)) = (fields.next(), fields.next()) {
                return code.parse().unwrap();
            }
            assert!(
                started.elapsed() < limit,
                "container {name} still running after {limit:?}:\n{}",
                self.logs(name)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// What container `name` printed (stdout and stderr).
    pub fn logs(&self, name: &str) -> String {
        let out = self.output(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The directory this podman keeps its state in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers hold mounts (their shm) under the run directory until removed.
        let _ = self.output(&["pod", "rm", "--all", "--force"]);
        let _ = self.output(&["rm", "--all", "--force"]);
        let _ = self.output(&["rmi", "--all", "--force"]);
    }
}

/// A directory holding `config.json` for `registry` with `user`/`password`, laid out as the
/// kubelet mounts a `kubernetes.io/dockerconfigjson` Secret with the item
/// `.dockerconfigjson` → `config.json` (mounted through a hostPath: podman 4.3's Secret volumes
/// crash).
pub fn docker_config_dir(parent: &Path, registry: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let dir = parent.join("regcred");
    std::fs::create_dir_all(&dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = serde_json::json!({ "auths": { registry: { "auth": auth } } });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

/// Parses YAML (one or several documents) with Python's yaml module into JSON values, the
/// way the tests read the deploy examples.
pub fn parse_yaml(text: &str) -> Vec<serde_json::Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(sys.stdin))))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with the yaml module (python3-yaml)");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "YAML did not parse");
    serde_json::from_slice(&out.stdout).unwrap()
}

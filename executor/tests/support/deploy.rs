//! What the deploy-example tests share: a loopback registry that demands Basic auth, the
//! registry Secret as a kubelet would mount it, Kiln's image loaded into podman, the example
//! files read as YAML and localised for this machine, and an app to build.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::kiln_image::{kiln_image, repo_root};
use kiln_testkit::{bases, Registry, RegistryConfig};

use super::podman::{docker_config_dir, parse_yaml, Podman};

/// The registry account the examples push with.
pub const USER: &str = "builder";
/// Its password.
pub const PASSWORD: &str = "kiln-pod-secret";
/// How Kiln's image is called in podman, as the examples' `REGISTRY/kiln/executor:TAG`.
pub const IMAGE: &str = "localhost/kiln/executor:latest";
/// Its debug variant.
pub const DEBUG_IMAGE: &str = "localhost/kiln/executor:debug";

/// One test's world: registry, podman with Kiln's images, the Secret's files, a work dir.
pub struct World {
    pub registry: Registry,
    pub podman: Podman,
    pub work: tempfile::TempDir,
    /// The directory mounted where the Secret would be (`config.json` inside).
    pub regcred: PathBuf,
}

impl World {
    /// Starts the registry (htpasswd auth), pushes the busybox base as `base/busybox:latest`,
    /// and loads Kiln's images (built by Kiln) into a fresh podman.
    pub fn new() -> World {
        kiln_testkit::require_tools(&["htpasswd", "skopeo", "python3", "git"]);
        let work = tempfile::Builder::new()
            .prefix("kiln-deploy-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let htpasswd = work.path().join("htpasswd");
        kiln_testkit::run(
            Command::new("htpasswd")
                .args(["-Bbc"])
                .arg(&htpasswd)
                .args([USER, PASSWORD]),
        );
        let registry = Registry::start_with(RegistryConfig {
            auth: Some(format!(
                "htpasswd:\n  realm: kiln\n  path: {}",
                htpasswd.display()
            )),
            ..RegistryConfig::default()
        });
        kiln_testkit::run(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-creds"])
                .arg(format!("{USER}:{PASSWORD}"))
                .arg(format!("oci:{}:latest", bases::busybox_layout().display()))
                .arg(format!("docker://{}/base/busybox:latest", registry.addr())),
        );
        let podman = Podman::new();
        podman.load(kiln_image(false), IMAGE);
        podman.load(kiln_image(true), DEBUG_IMAGE);
        let regcred = docker_config_dir(work.path(), &registry.addr(), USER, PASSWORD);
        World {
            registry,
            podman,
            work,
            regcred,
        }
    }

    /// The registry's `host:port`.
    pub fn addr(&self) -> String {
        self.registry.addr()
    }

    /// A build context (a checked-out app): a Dockerfile FROM the registry's busybox with a RUN
    /// and a COPY, and `hello.txt`. The built image prints `built in a pod` and `hello`.
    pub fn app(&self, name: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("Dockerfile"),
            format!(
                "FROM {}/base/busybox:latest\n\
                 RUN echo 'built in a pod' > /built.txt\n\
                 COPY hello.txt /hello.txt\n\
                 CMD [\"cat\", \"/built.txt\", \"/hello.txt\"]\n",
                self.addr()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("hello.txt"), "hello\n").unwrap();
        dir
    }

    /// Pulls `reference` (in the registry, with the account) with podman and runs its default
    /// command with podman's defaults; what it printed.
    pub fn run_result(&self, reference: &str) -> String {
        let creds = format!("{USER}:{PASSWORD}");
        let image = format!("{}/{reference}", self.addr());
        self.podman.run(&[
            "pull",
            "-q",
            "--tls-verify=false",
            "--creds",
            &creds,
            &image,
        ]);
        self.podman.run(&["run", "--rm", "--network=host", &image])
    }

    /// The tags of `repo` in the registry.
    pub fn tags(&self, repo: &str) -> Vec<String> {
        let out = kiln_testkit::run(
            Command::new("skopeo")
                .args(["list-tags", "--tls-verify=false", "--creds"])
                .arg(format!("{USER}:{PASSWORD}"))
                .arg(format!("docker://{}/{repo}", self.addr())),
        );
        let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
        listing["Tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect()
    }

    /// `value` with every example placeholder made real for this machine: Kiln's images as
    /// loaded into podman, `REGISTRY` the loopback registry; the Pod on the host's network (the
    /// registry listens on loopback) and the registry Secret replaced by a hostPath holding the
    /// same file (podman 4.3's Secret volumes crash).
    pub fn localise(&self, value: &mut serde_json::Value) {
        let addr = self.addr();
        replace_strings(value, &|text| {
            text.replace("REGISTRY/kiln/executor:latest", IMAGE)
                .replace("REGISTRY/kiln/executor:debug", DEBUG_IMAGE)
                .replace("REGISTRY", &addr)
        });
        let spec = pod_spec(value);
        spec["hostNetwork"] = true.into();
        for volume in spec["volumes"].as_array_mut().into_iter().flatten() {
            if volume.get("secret").is_some() {
                let name = volume["name"].clone();
                *volume = serde_json::json!({
                    "name": name,
                    "hostPath": { "path": self.regcred, "type": "Directory" },
                });
            }
        }
    }
}

/// Applies `edit` to every string in `value`.
pub fn replace_strings(value: &mut serde_json::Value, edit: &dyn Fn(&str) -> String) {
    match value {
        serde_json::Value::String(text) => *text = edit(text),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| replace_strings(v, edit)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|v| replace_strings(v, edit)),
        _ => {}
    }
}

/// The Pod spec of a Pod, or of a Job's Pod template.
pub fn pod_spec(value: &mut serde_json::Value) -> &mut serde_json::Value {
    if value["kind"] == "Job" {
        &mut value["spec"]["template"]["spec"]
    } else {
        &mut value["spec"]
    }
}

/// The text of `executor/deploy/NAME`.
pub fn example(name: &str) -> String {
    let path = repo_root().join("executor/deploy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of the YAML example `name`.
pub fn example_yaml(name: &str) -> Vec<serde_json::Value> {
    parse_yaml(&example(name))
}

/// The hostPath volume named `name` of a Pod spec pointed at `path`.
pub fn set_host_path(spec: &mut serde_json::Value, name: &str, path: &Path) {
    let volume = spec["volumes"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"));
    volume["hostPath"]["path"] = path.to_string_lossy().into_owned().into();
}

/// The arguments of the first container of a Pod spec, or of a Tekton step.
pub fn args_of(container: &serde_json::Value) -> Vec<String> {
    container["args"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

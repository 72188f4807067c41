//! A buildpacks world for the executor's tests: a registry holding a busybox run image and a
//! CNB builder image that Kiln builds from a Dockerfile with the test buildpacks of
//! `testdata/buildpacks` (shell scripts, Buildpack API 0.10 and 0.11).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_testkit::{bases, image, Registry};

/// The repository:tag of the run image the builder names.
pub const RUN_IMAGE: &str = "run/a:latest";
/// The repository:tag of the builder image.
pub const BUILDER: &str = "builders/test:1";

/// The workspace's `testdata/`.
pub fn testdata() -> PathBuf {
    kiln_testkit::cnb::workspace_root().join("testdata")
}

/// Runs the executor with Kiln's static lifecycle binaries and no docker config of the
/// machine.
pub fn executor(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(args)
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env("KILN_LIFECYCLE_DIR", kiln_testkit::cnb::lifecycle_dir())
        .env_remove("KANIKO_NO_PUSH")
        .output()
        .expect("run executor")
}

/// The executor's standard error.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A registry with the run image and the builder, and a work directory.
pub struct World {
    pub registry: Registry,
    pub addr: String,
    pub work: tempfile::TempDir,
}

impl World {
    /// Starts the registry, pushes the run image and builds the builder with Kiln.
    pub fn new() -> World {
        kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci", "runc"]);
        let registry = Registry::start();
        let addr = registry.addr();
        image::push_rootfs(&registry, bases::busybox_rootfs(), RUN_IMAGE);
        let world = World {
            registry,
            addr,
            work: tempfile::tempdir().unwrap(),
        };
        world.build_builder();
        world
    }

    /// A fresh directory under the work directory.
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `REGISTRY/repo:tag`.
    pub fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// The builder: busybox with the test buildpacks in `/cnb/buildpacks`, their order in
    /// `/cnb/order.toml`, a CNB user and the builder label naming the run image, made by Kiln
    /// from a Dockerfile.
    fn build_builder(&self) {
        let context = self.dir("builder-context");
        kiln_testkit::run(
            Command::new("cp")
                .arg("-a")
                .arg(testdata().join("buildpacks"))
                .arg(context.join("buildpacks")),
        );
        let buildpacks: Vec<String> = std::fs::read_dir(testdata().join("buildpacks"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| {
                let id = e.file_name().to_string_lossy().replacen('_', "/", 1);
                format!(r#"{{"id":"{id}","version":"1.0.0"}}"#)
            })
            .collect();
        let metadata = format!(
            r#"{{"description":"Kiln test builder","images":[{{"image":"{}"}}],"buildpacks":[{}]}}"#,
            self.image(RUN_IMAGE),
            buildpacks.join(",")
        );
        std::fs::write(
            context.join("Dockerfile"),
            format!(
                "FROM {run}\n\
                 COPY buildpacks/ /cnb/buildpacks/\n\
                 COPY buildpacks/order.toml /cnb/order.toml\n\
                 ENV CNB_USER_ID=1000 CNB_GROUP_ID=1000\n\
                 LABEL io.buildpacks.builder.metadata='{metadata}'\n",
                run = self.image(RUN_IMAGE),
            ),
        )
        .unwrap();
        let out = executor(&[
            format!("--context={}", context.display()),
            format!("--destination={}", self.image(BUILDER)),
            format!("--kiln-dir={}", self.dir("kiln-builder").display()),
            "--mode=chroot".into(),
            "--progress=plain".into(),
        ]);
        assert!(
            out.status.success(),
            "building the builder: {}",
            stderr(&out)
        );
    }

    /// A copy of `testdata/apps/NAME`, to change at will.
    pub fn app(&self, name: &str) -> PathBuf {
        let dir = self.work.path().join(format!("app-{name}"));
        kiln_testkit::run(
            Command::new("cp")
                .arg("-a")
                .arg(testdata().join("apps").join(name))
                .arg(&dir),
        );
        dir
    }

    /// Builds `app` to `destination` in chroot mode with `extra` flags; the executor's output.
    pub fn build(&self, app: &Path, destination: &str, extra: &[String]) -> Output {
        let mut args = vec![
            format!("--context={}", app.display()),
            format!("--destination={}", self.image(destination)),
            format!("--kiln-dir={}", self.dir("kiln").display()),
            "--mode=chroot".into(),
            "--progress=plain".into(),
        ];
        args.extend(extra.iter().cloned());
        executor(&args)
    }

    /// Whether `repo_tag` exists in the registry.
    pub fn exists(&self, repo_tag: &str) -> bool {
        Command::new("skopeo")
            .args(["inspect", "--tls-verify=false"])
            .arg(format!("docker://{}", self.image(repo_tag)))
            .output()
            .unwrap()
            .status
            .success()
    }
}

/// Runs `flat`'s bundle with `args` instead of its own entrypoint and command (None: its own);
/// stdout, or a panic with stderr.
pub fn run_process(flat: &image::Flattened, args: Option<&[&str]>) -> String {
    if let Some(args) = args {
        let path = flat.bundle.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config["process"]["args"] = args.iter().map(|a| serde_json::Value::from(*a)).collect();
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    }
    image::run_with_runc(flat)
}

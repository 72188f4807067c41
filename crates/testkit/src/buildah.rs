//! buildah as the reference oracle: builds a context with a private storage root, resolving
//! short image names (`busybox`, `debian:bookworm`) to a test registry, and pushes the result.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{require_tools, Registry};

/// A buildah instance with its own storage, so tests never see or touch other images.
pub struct Buildah {
    dir: tempfile::TempDir,
    registry: String,
}

impl Buildah {
    /// Prepares storage and a `registries.conf` that maps `docker.io` to `registry` (plain HTTP).
    pub fn new(registry: &Registry) -> Buildah {
        require_tools(&["buildah"]);
        let dir = tempfile::Builder::new()
            .prefix("kiln-engineah-")
            .tempdir()
            .expect("tempdir");
        let conf = format!(
            "unqualified-search-registries = [\"docker.io\"]\n\n\
             [[registry]]\nprefix = \"docker.io\"\nlocation = \"{addr}\"\ninsecure = true\n\n\
             [[registry]]\nlocation = \"{addr}\"\ninsecure = true\n",
            addr = registry.addr()
        );
        std::fs::write(dir.path().join("registries.conf"), conf).unwrap();
        Buildah {
            dir,
            registry: registry.addr(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.env("BUILDAH_ISOLATION", "chroot")
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.path().join("registries.conf"),
            )
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            .args(["--storage-driver", "overlay"]);
        cmd
    }

    /// Builds `context` (with `dockerfile`, default `context/Dockerfile`) and pushes it to the
    /// test registry as `repo_tag`. Returns buildah's combined output on failure.
    pub fn build_and_push(
        &self,
        context: &Path,
        dockerfile: Option<&Path>,
        build_args: &[(&str, &str)],
        target: Option<&str>,
        repo_tag: &str,
    ) -> Result<(), String> {
        let local = format!("localhost/kiln-oracle/{repo_tag}");
        let mut cmd = self.command();
        cmd.args(["bud", "--tls-verify=false", "--layers", "--format", "oci"]);
        let dockerfile: PathBuf = dockerfile
            .map(Path::to_path_buf)
            .unwrap_or_else(|| context.join("Dockerfile"));
        cmd.arg("-f").arg(dockerfile);
        for (k, v) in build_args {
            cmd.arg("--build-arg").arg(format!("{k}={v}"));
        }
        if let Some(t) = target {
            cmd.args(["--target", t]);
        }
        cmd.args(["-t", &local]).arg(context);
        match run_captured(&mut cmd) {
            // buildah 1.28 now and then fails a RUN with "Close_Fd sealing memfd copy: Device or
            // resource busy", a race of its own that the same build does not hit again; it is
            // the oracle failing, not the case, so it gets one more try.
            Err(error) if error.contains("sealing memfd copy") => run_captured(&mut cmd)?,
            other => other?,
        }
        let mut push = self.command();
        push.args(["push", "--tls-verify=false", &local])
            .arg(format!("docker://{}/{repo_tag}", self.registry));
        run_captured(&mut push)
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        // Overlay mounts under the root must go before the directory can be removed.
        let _ = self.command().args(["rm", "--all"]).output();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("root/overlay"))
            .output();
        let _ = self.command().args(["rmi", "--all", "--force"]).output();
    }
}

fn run_captured(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

//! Kiln's own image as users get it: built by Kiln from `executor/Containerfile` with
//! `scripts/executor-image` (the static executor just compiled builds the image it goes into).
//! Made once per content of the image's context and kept under the target directory, so every
//! test process, and later runs with nothing changed, reuse it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest as _, Sha256};

use crate::{build_once, run};

/// One variant of Kiln's image in an OCI layout.
#[derive(Debug, Clone)]
pub struct KilnImage {
    /// The OCI layout holding it, tagged `latest`.
    pub layout: PathBuf,
    /// Its manifest digest, as the build reported it (`sha256:...`).
    pub digest: String,
    /// The context it was built from (`rootfs/` is what the image holds).
    pub context: PathBuf,
}

/// The checkout this crate is in.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("checkout root")
}

/// Where cargo puts build output for this checkout.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Kiln's image, or with `debug` its `:debug` variant (busybox at `/busybox`). The first call
/// in a process makes the context with `executor/image-context.sh` (a release build of the
/// static binaries; quick when they are up to date) and builds the image unless an image of
/// that very context exists already.
pub fn kiln_image(debug: bool) -> &'static KilnImage {
    static PLAIN: OnceLock<KilnImage> = OnceLock::new();
    static DEBUG: OnceLock<KilnImage> = OnceLock::new();
    let cell = if debug { &DEBUG } else { &PLAIN };
    cell.get_or_init(|| make(debug))
}

fn make(debug: bool) -> KilnImage {
    let variant = if debug { "debug" } else { "plain" };
    let base = target_dir().join("kiln-image");
    std::fs::create_dir_all(&base).unwrap();
    let context = base.join(format!("context-{variant}"));
    {
        // One process at a time rewrites the context; the others wait and then see it made.
        let _lock = lock(&base.join(format!("context-{variant}.lock")));
        let mut script = Command::new(repo_root().join("executor/image-context.sh"));
        script.arg(&context);
        if debug {
            script.arg("--debug");
        }
        run(&mut script);
    }
    // scripts/executor-image dates the image at the checkout's last commit, so an image kept
    // from an earlier commit with the same binaries is not this commit's image.
    let key = tree_digest(&context);
    let epoch = commit_time();
    let dir = base.join(format!("{variant}-{}-{epoch}", &key[..16]));
    build_once(&dir, |partial| {
        let mut build = Command::new(repo_root().join("scripts/executor-image"));
        if debug {
            build.arg("--debug");
        }
        build
            .arg("--no-push")
            .arg(format!(
                "--oci-layout-path={}",
                partial.join("layout").display()
            ))
            .arg(format!(
                "--digest-file={}",
                partial.join("digest").display()
            ))
            .env("KILN_IMAGE_CONTEXT", &context)
            .env("DOCKER_CONFIG", "/nonexistent-kiln-test");
        run(&mut build);
    });
    let layout = dir.join("layout");
    KilnImage {
        digest: layout_digest(&layout),
        layout,
        context,
    }
}

/// The checkout's last commit time, as `scripts/executor-image` reads it for
/// `SOURCE_DATE_EPOCH` (0 outside a git checkout).
fn commit_time() -> String {
    Command::new("git")
        .arg("-C")
        .arg(repo_root())
        .args(["log", "-1", "--format=%ct"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|time| !time.is_empty())
        .unwrap_or_else(|| "0".into())
}

/// An exclusive `flock` on `path`, held until the file is dropped.
fn lock(path: &Path) -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    // SAFETY: flock on a file descriptor we own; released when the file is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {} failed", path.display());
    file
}

/// A digest of every entry of `dir` (names, types, modes, link targets, contents), which
/// names the image built from it.
pub fn tree_digest(dir: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names.into_iter().rev() {
            let child = rel.join(&name);
            let path = dir.join(&child);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            hasher.update(format!("{}\0{mode:o}\0", child.display()).as_bytes());
            if meta.file_type().is_symlink() {
                hasher.update(
                    std::fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_encoded_bytes(),
                );
            } else if meta.is_dir() {
                stack.push(child);
            } else {
                hasher.update(std::fs::read(&path).unwrap());
            }
        }
    }
    hex::encode(hasher.finalize())
}

/// The digest of the one manifest in the OCI layout at `layout` (the executor writes its
/// `--digest-file` only after a push; these builds do not push).
pub fn layout_digest(layout: &Path) -> String {
    let path = layout.join("index.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let index: serde_json::Value = serde_json::from_str(&text).unwrap();
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "{}: {text}", path.display());
    manifests[0]["digest"].as_str().expect("digest").to_owned()
}

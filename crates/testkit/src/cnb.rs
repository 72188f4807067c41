//! Kiln's lifecycle binaries and own buildpacks for buildpacks tests: built static (they run in
//! images of any distribution) by `scripts/build-lifecycle` and `scripts/build-buildpacks`, once per test process and under a lock across
//! processes; cargo itself rebuilds them only when their sources changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit is two levels below the workspace")
        .to_path_buf()
}

/// A directory holding static `kiln-lifecycle` and `launcher` executables, as
/// `KILN_LIFECYCLE_DIR` names it.
pub fn lifecycle_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| run_script("build-lifecycle", "lifecycle"))
}

/// The target triple the launcher in [`lifecycle_dir`] was built for, as
/// `scripts/build-lifecycle` records it in `launcher.target`: the musl target of the host's
/// architecture when the toolchain has it, else the host's gnu target (static glibc, larger).
pub fn launcher_target() -> String {
    let file = lifecycle_dir().join("launcher.target");
    let target = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    target.trim().to_owned()
}

/// Kiln's own buildpacks as Kiln ships them (the repository's `buildpacks/` plus the static
/// file server the static buildpack needs), as `KILN_BUILDPACKS_DIR` names it.
pub fn buildpacks_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| run_script("build-buildpacks", "buildpacks"))
}

/// Runs `scripts/SCRIPT target/NAME` under a lock shared by every test process (the scripts
/// build with cargo, which rebuilds only what changed), and returns that directory.
fn run_script(script: &str, name: &str) -> PathBuf {
    let root = workspace_root();
    let out = root.join("target").join(name);
    std::fs::create_dir_all(root.join("target")).unwrap();
    let lock_path = root.join("target").join(format!("{name}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
    // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {} failed", lock_path.display());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let cargo_dir = Path::new(&cargo).parent().map(Path::to_path_buf);
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = cargo_dir.filter(|d| !d.as_os_str().is_empty()) {
        let mut joined = dir.into_os_string();
        joined.push(":");
        joined.push(&path);
        path = joined;
    }
    crate::run(
        Command::new(root.join("scripts").join(script))
            .arg(&out)
            .env("PATH", path)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    );
    drop(lock);
    out
}

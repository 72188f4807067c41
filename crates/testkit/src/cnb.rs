//! Kiln's lifecycle binaries for buildpacks tests: built static (they run in images of any
//! distribution) by `scripts/build-lifecycle`, once per test process and under a lock across
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
    DIR.get_or_init(|| {
        let root = workspace_root();
        let out = root.join("target").join("lifecycle");
        std::fs::create_dir_all(&out).unwrap();
        let lock_path = root.join("target").join("lifecycle.lock");
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
            Command::new(root.join("scripts/build-lifecycle"))
                .arg(&out)
                .env("PATH", path)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS"),
        );
        drop(lock);
        out
    })
}

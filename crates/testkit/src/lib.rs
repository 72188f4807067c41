//! Real parts for Kiln's tests: a `docker-registry` process on a loopback port (plain HTTP or
//! TLS, with client certificates if asked), certificates made by the `openssl` command, base
//! root filesystems (busybox-static, debootstrap'd Debian) built once per machine and shared
//! by every test process, one-layer images of those trees pushed with skopeo, and bases that
//! share the busybox layer under configs of their own (see [`configured`]), and a proxy that
//! injects registry faults between a client and the real registry (see [`faults`]).
//!
//! Nothing here mocks a registry or a tool: a test that needs one gets the real thing, or a
//! clear panic saying which Debian package is missing.

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bases;
pub mod buildah;
pub mod certs;
pub mod cnb;
pub mod configured;
pub mod faults;
pub mod git;
pub mod hostile;
pub mod http;
pub mod image;
pub mod kiln_image;
pub mod langs;
mod registry;
pub mod tree;

pub use registry::{Registry, RegistryConfig};

use std::path::{Path, PathBuf};
use std::process::Command;

/// Panics with the missing tool's name and its Debian package hint unless every tool is on PATH,
/// so a test on an unprepared machine fails with a reason instead of an obscure spawn error.
pub fn require_tools(tools: &[&str]) {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "required tools not installed: {} (run .ci/run or apt-get install the packages listed in ../shared/ENVIRONMENT.md)",
        missing.join(", ")
    );
}

/// Finds an executable on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Runs a command to completion and panics with its command line, status and stderr if it fails;
/// returns stdout. Tests use it for the reference tools (skopeo, umoci, tar).
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Directory where machine-wide test fixtures are cached: `$KILN_TEST_CACHE`, else
/// `/var/tmp/kiln-testcache/v1` (outside the checkout so fresh clones on the same machine reuse
/// the 30-second debootstrap; the version suffix changes whenever a fixture recipe changes).
pub fn cache_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/kiln-testcache/v1"));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create test cache {}: {e}", dir.display()));
    dir
}

/// Builds `dir` once across all processes: if it exists it is returned as is; otherwise `make`
/// fills a sibling temporary directory under an exclusive `flock`, which is then renamed into
/// place, so a crashed build never leaves a half-made fixture behind.
pub fn build_once(dir: &Path, make: impl FnOnce(&Path)) {
    if dir.exists() {
        return;
    }
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
    // SAFETY: flock on a file descriptor we own; it is released when `lock` is dropped.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {} failed", lock_path.display());
    if dir.exists() {
        return;
    }
    let partial = dir.with_extension("partial");
    if partial.exists() {
        run(Command::new("rm").arg("-rf").arg(&partial));
    }
    std::fs::create_dir_all(&partial).unwrap();
    make(&partial);
    std::fs::rename(&partial, dir)
        .unwrap_or_else(|e| panic!("cannot move fixture into {}: {e}", dir.display()));
    drop(lock);
}

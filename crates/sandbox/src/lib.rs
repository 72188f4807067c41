//! Runs the `RUN` steps of a build: one [`Sandbox`] trait, two implementations.
//!
//! - [`ChrootSandbox`] (the default outside a container; needs root): each step gets new mount,
//!   pid, uts and ipc namespaces, enters the stage rootfs with `pivot_root`, and sees a fresh
//!   `/proc`, a minimal `/dev` (null, zero, full, random, urandom, tty bound from the host, a
//!   private devpts instance, a tmpfs `/dev/shm`), a read-only `/sys`, and generated
//!   `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`. The network is the host's, or with
//!   [`Network::None`] a new network namespace holding only loopback. The step
//!   keeps Docker's default capability set. This is isolation for builds, not a security
//!   boundary against hostile Dockerfiles (the step is real root on the host's kernel, as with
//!   buildah's chroot isolation).
//! - [`InPlaceSandbox`] (inside a container, as in a Pod): the rootfs is `/`; the step runs
//!   directly, in a new session, and its process tree is killed when it ends. Its mounts and
//!   [`Network::None`] need a namespace of their own, so `CAP_SYS_ADMIN`, which a default Pod
//!   lacks.
//!
//! Both resolve USER from the rootfs's own `/etc/passwd` and `/etc/group`, add `PATH` and
//! `HOME` to the caller's environment when missing, create a missing WORKDIR, stream output
//! line by line to an [`OutputSink`], map signal deaths to 128+signal, can be cancelled with a
//! [`CancelToken`], and return only once every process the step started is gone.
//!
//! # What a step leaves in the rootfs (for the snapshotter)
//!
//! In chroot mode all mounts live in the step's own mount namespace, which disappears with the
//! step; nothing is ever mounted in the caller's namespace. The rootfs itself is touched only
//! where it lacks a mount target:
//! - missing targets among [`CHROOT_MOUNT_POINTS`] and the targets of [`MountSpec`]s (and their
//!   missing parent directories) are created before the step, as empty files or directories,
//!   and removed after it (unless the step put something into a created directory);
//! - the directories they were created in get their atime/mtime back unless the step changed
//!   them too; they are listed in [`RunOutcome::restored_dirs`] because their ctime is newer
//!   although their content and metadata are as before.
//!
//! The WORKDIR, when missing, is created for real (owned by the step's user) and belongs in the
//! layer, as with Docker. In in-place mode only [`MountSpec`] targets are created and removed;
//! `/proc`, `/sys`, `/dev` and the `/etc` files are the container's own.
//!
//! # Threads
//!
//! [`Sandbox::run`] blocks the calling thread until the step is over: it is the thread that
//! supervises the step, and the step's processes are killed if that thread dies (Linux's
//! parent-death signal is per thread). Run it on a thread that lives as long as the call, e.g.
//! `tokio::task::spawn_blocking`. Nothing else in the process may reap children with
//! `waitpid(-1, ...)` or ignore SIGCHLD.

#![warn(clippy::undocumented_unsafe_blocks)]

mod cancel;
mod chroot;
mod error;
mod inplace;
mod output;
mod process;
mod rootpath;
mod step;
mod user;

use std::path::{Path, PathBuf};

pub use cancel::CancelToken;
pub use chroot::{
    ChrootSandbox, CHROOT_MOUNT_POINTS, DEFAULT_HOSTNAME, DOCKER_DEFAULT_CAPABILITIES,
};
pub use error::SandboxError;
pub use inplace::InPlaceSandbox;
pub use output::{OutputLine, OutputSink, OutputStream, MAX_LINE};
pub use step::{Command, MountKind, MountSpec, Network, Step, DEFAULT_PATH, DEFAULT_SHELL};
pub use user::{resolve_user, ResolvedUser};

/// How RUN steps are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Namespaces and pivot_root into a stage rootfs ([`ChrootSandbox`]).
    Chroot,
    /// Directly in the current container, whose `/` is the rootfs ([`InPlaceSandbox`]).
    InPlace,
}

impl Mode {
    /// In-place when this process looks like it runs in a container ([`in_container`]),
    /// chroot otherwise. The CLI's explicit choice should override this.
    pub fn detect() -> Mode {
        if in_container() {
            Mode::InPlace
        } else {
            Mode::Chroot
        }
    }
}

/// Whether this process has CAP_SYS_ADMIN in its effective set: in-place, what a step's own
/// mount or network namespace needs.
pub fn has_sys_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|status| inplace::has_sys_admin_in(&status))
}

/// Whether this process looks like it runs in a container. Signs: a `KUBERNETES_SERVICE_HOST`
/// or `container` variable, a `/run/.containerenv` file, a container runtime in
/// `/proc/1/cgroup`, a `/.dockerenv` file together with an overlay root filesystem (a
/// `/.dockerenv` alone is often left in VM images made from container images), or a root
/// mount that is a subdirectory of its filesystem, as a bare runc container's bind-mounted
/// rootfs is (btrfs roots are left out: their subvolumes look the same on a plain host).
/// In-place builds delete `/`, so they refuse to run when this is false unless forced.
pub fn in_container() -> bool {
    let env = ["KUBERNETES_SERVICE_HOST", "container"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    let containerenv = Path::new("/run/.containerenv").exists();
    let cgroup = std::fs::read_to_string("/proc/1/cgroup")
        .map(|c| {
            ["docker", "kubepods", "containerd", "libpod"]
                .iter()
                .any(|k| c.contains(k))
        })
        .unwrap_or(false);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dockerenv = Path::new("/.dockerenv").exists() && root_is_overlay();
    env || containerenv || cgroup || dockerenv || root_is_subdirectory(&mountinfo)
}

/// Whether the topmost mount on `/` in a mountinfo text shows a subdirectory of its filesystem
/// (field 4, the mount's root, is not `/`) on a filesystem other than btrfs.
fn root_is_subdirectory(mountinfo: &str) -> bool {
    let Some(line) = mountinfo
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some("/"))
    else {
        return false;
    };
    let fs_root = line.split(' ').nth(3).unwrap_or("/");
    let fstype = line
        .split(" - ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or("");
    fs_root != "/" && fstype != "btrfs"
}

/// Whether `/` is an overlay-type filesystem, as container runtimes give their containers.
fn root_is_overlay() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .as_deref()
        .and_then(root_fstype)
        .is_some_and(|fstype| fstype.contains("overlay") || fstype == "aufs")
}

/// The filesystem type of the topmost mount on `/` in a mountinfo text (fields: id, parent,
/// dev, root, mount point, ..., `-`, fstype, source, options).
fn root_fstype(mountinfo: &str) -> Option<&str> {
    mountinfo
        .lines()
        .rev()
        .filter(|l| l.split(' ').nth(4) == Some("/"))
        .find_map(|l| l.split(" - ").nth(1)?.split(' ').next())
}

/// How a step's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The code a shell would report: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }

    /// Whether the command exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    pub(crate) fn from_wait_status(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signal(libc::WTERMSIG(status))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s} (exit code {})", 128 + s),
        }
    }
}

/// The result of a step that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// How the step's command ended.
    pub status: ExitStatus,
    /// Directories (paths inside the rootfs) in which the sandbox created and removed mount
    /// targets and whose atime/mtime it restored: unchanged except for their ctime.
    pub restored_dirs: Vec<PathBuf>,
}

/// Runs RUN steps in one rootfs. One implementation per [`Mode`].
pub trait Sandbox: Send + Sync {
    /// Which isolation this is.
    fn mode(&self) -> Mode;

    /// The host path of the rootfs the steps run in (`/` in in-place mode).
    fn rootfs(&self) -> &Path;

    /// Whether a step asking for [`Network::None`] can get a network namespace of its own.
    /// When this is false such a step fails to start, so callers that would rather run it
    /// with the host's network (and say so) check first.
    fn isolates_network(&self) -> bool;

    /// Whether a step can get mounts of its own ([`Step::mounts`]): always in chroot mode;
    /// in-place only with CAP_SYS_ADMIN, which a default Pod does not grant.
    fn mounts_available(&self) -> bool;

    /// Runs one step to its end, streaming its output to `sink`; returns once every process it
    /// started is gone. A non-zero exit is an `Ok` with that status; `Err` means the step could
    /// not be run (bad USER, missing program, setup failure) or was cancelled.
    fn run(
        &self,
        step: &Step,
        sink: &mut dyn OutputSink,
        cancel: &CancelToken,
    ) -> Result<RunOutcome, SandboxError>;
}

/// The sandbox for `mode`: chroot mode on `rootfs`, or in-place mode (where `rootfs` must be
/// `/`, the only rootfs in-place mode can run in).
pub fn open(mode: Mode, rootfs: &Path) -> Result<Box<dyn Sandbox>, SandboxError> {
    match mode {
        Mode::Chroot => Ok(Box::new(ChrootSandbox::new(rootfs)?)),
        Mode::InPlace if rootfs == Path::new("/") => Ok(Box::new(InPlaceSandbox::new())),
        Mode::InPlace => Err(SandboxError::BadPath {
            path: rootfs.to_path_buf(),
            reason: "in-place mode runs in / only".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_fstype_from_mountinfo() {
        let docker = "1226 1098 0:64 / / rw,relatime master:320 - overlay overlay rw,lowerdir=/l\n\
                      1227 1226 0:66 / /proc rw,nosuid - proc proc rw\n";
        assert_eq!(root_fstype(docker), Some("overlay"));
        let vm =
            "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n22 27 0:21 / /proc rw - proc proc rw\n";
        assert_eq!(root_fstype(vm), Some("ext4"));
        assert_eq!(root_fstype(""), None);
    }

    #[test]
    fn bare_runc_root_is_a_subdirectory() {
        let runc = "600 550 254:0 /tmp/bundle/rootfs / rw,relatime - ext4 /dev/vda rw\n\
                    601 600 0:70 / /proc rw - proc proc rw\n";
        assert!(root_is_subdirectory(runc));
        let vm = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n";
        assert!(!root_is_subdirectory(vm));
        let btrfs_subvolume = "27 1 0:25 /@ / rw,relatime - btrfs /dev/sda2 rw\n";
        assert!(!root_is_subdirectory(btrfs_subvolume));
        assert!(!root_is_subdirectory(""));
    }

    #[test]
    fn exit_status_codes() {
        assert_eq!(ExitStatus::Signal(9).code(), 137);
        assert_eq!(ExitStatus::Code(3).code(), 3);
        assert!(!ExitStatus::Signal(15).success());
    }
}

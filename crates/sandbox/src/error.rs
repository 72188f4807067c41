//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

/// Why a step could not be run to completion. A step that ran and exited non-zero is not an
/// error: that is an [`crate::ExitStatus`] in the [`crate::RunOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The USER of the step names a user that `/etc/passwd` of the rootfs does not list.
    #[error("unable to find user {user:?}: no matching entry in {}", path.display())]
    UnknownUser {
        /// The user part of the USER spec, as written.
        user: String,
        /// The passwd file that was searched (host path).
        path: PathBuf,
    },
    /// The USER of the step names a group that `/etc/group` of the rootfs does not list.
    #[error("unable to find group {group:?}: no matching entry in {}", path.display())]
    UnknownGroup {
        /// The group part of the USER spec, as written.
        group: String,
        /// The group file that was searched (host path).
        path: PathBuf,
    },
    /// A numeric uid or gid in the USER spec is outside 0..=2^31-1.
    #[error("{what} {value} in USER {spec:?} is out of range (0 to 2147483647)")]
    IdOutOfRange {
        /// "uid" or "gid".
        what: &'static str,
        /// The offending number.
        value: u64,
        /// The whole USER spec.
        spec: String,
    },
    /// The step itself is malformed (empty command, NUL byte in an argument or variable, ...).
    #[error("invalid step: {0}")]
    InvalidStep(String),
    /// A file or directory of the rootfs (or a mount source) could not be read or prepared.
    #[error("{}: {source}", path.display())]
    Io {
        /// Host path of the file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A path inside the rootfs cannot be used: too many symlinks, or a file where a directory
    /// is needed (or the reverse).
    #[error("{}: {reason}", path.display())]
    BadPath {
        /// Host path of the entry concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A path inside the rootfs could not be resolved, read or created inside it; the error
    /// names the path and the rootfs.
    #[error(transparent)]
    Contained(#[from] kiln_fs::resolve::RootError),
    /// The sandbox could not be set up (a mount, pivot_root, a user switch, the working
    /// directory); `operation` says which step and on which path.
    #[error("sandbox setup failed: {operation}: {source}")]
    Setup {
        /// Description of the failed operation, naming its paths.
        operation: String,
        /// The errno the kernel returned.
        #[source]
        source: io::Error,
    },
    /// The step's program could not be executed (not found, not executable).
    #[error("cannot execute {program:?}: {source}")]
    Exec {
        /// The program as named by the step (`argv[0]`).
        program: String,
        /// The errno of the last `execve` attempt (ENOENT when it is on no PATH entry).
        #[source]
        source: io::Error,
    },
    /// A system call of the supervising process failed (pipe, clone, poll, waitpid).
    #[error("{operation}: {source}")]
    Os {
        /// The system call and what it was for.
        operation: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The sandbox's init process died without reporting the step's status.
    #[error("the sandbox init process died unexpectedly ({0})")]
    InitDied(String),
    /// The step was cancelled through its [`crate::CancelToken`]; all its processes are gone.
    #[error("step cancelled")]
    Cancelled,
}

impl SandboxError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        SandboxError::Io {
            path: path.into(),
            source,
        }
    }
}

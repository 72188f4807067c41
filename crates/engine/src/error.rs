//! [`BuildError`]: why a build failed, with where (the step's `FILE:LINE`, the registry, the
//! path) in the message and the underlying error as its source.

use std::path::PathBuf;

/// An error of any of the engine's parts, kept as the source of the [`BuildError`] that says
/// where it happened.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a build failed. The executor maps [`BuildError::RunFailed`] to the step's own exit status
/// and everything else to exit code 1.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The front end refused its input (a Dockerfile that does not parse or plan); the message
    /// carries `FILE:LINE`.
    #[error("{0}")]
    Plan(String),
    /// A run step exited non-zero.
    #[error("{at}: {what} failed with exit code {code}")]
    RunFailed {
        /// Where the step was written (`Dockerfile:12`).
        at: String,
        /// What ran (`RUN`).
        what: String,
        /// The command's exit status (128+N for a signal).
        code: i32,
    },
    /// A step failed for another reason.
    #[error("{at}: {source}")]
    Step {
        /// Where the step was written (`Dockerfile:12`).
        at: String,
        /// What went wrong.
        #[source]
        source: Cause,
    },
    /// The build context could not be opened or read.
    #[error("build context: {0}")]
    Context(#[source] Cause),
    /// A registry refused or failed; the message names the registry, repository and status.
    #[error(transparent)]
    Registry(#[from] kiln_registry::Error),
    /// An image could not be used or made (a bad manifest or config, a missing platform, a
    /// layer that does not unpack or cannot be written).
    #[error("{what}: {source}")]
    Image {
        /// The image or layer concerned.
        what: String,
        /// What went wrong.
        #[source]
        source: Cause,
    },
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The options are inconsistent (for example in-place mode outside a container without
    /// `--force`).
    #[error("invalid options: {0}")]
    Options(String),
    /// The build was stopped through its [`crate::Cancel`] handle before it had pushed its
    /// manifests: nothing was tagged, no digest file was written, the step's processes were
    /// killed and the build's mounts and work dir removed.
    #[error("the build was cancelled")]
    Cancelled,
}

impl BuildError {
    /// The process exit code the executor uses for this error: a failing RUN's own status, 1
    /// for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::RunFailed { code, .. } if *code != 0 => *code,
            _ => 1,
        }
    }

    /// A failure of `what` (an image, a layer) caused by `source`.
    pub(crate) fn image(what: impl Into<String>, source: impl Into<Cause>) -> BuildError {
        BuildError::Image {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A failure of the step written at `at`, caused by `source`.
    pub(crate) fn step(at: impl Into<String>, source: impl Into<Cause>) -> BuildError {
        BuildError::Step {
            at: at.into(),
            source: source.into(),
        }
    }

    /// A failure reading or writing `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BuildError {
        let path = path.into();
        move |source| BuildError::Io { path, source }
    }
}

//! [`BuildError`]: why a build failed, with where (Dockerfile line, registry, path) in the message.

use std::path::PathBuf;

/// Why a build failed. The executor maps [`BuildError::RunFailed`] to the step's own exit status
/// and everything else to exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile is invalid; the message carries `Dockerfile:LINE`.
    #[error("{0}")]
    Dockerfile(String),
    /// A RUN step exited non-zero.
    #[error("{file}:{line}: RUN failed with exit code {code}")]
    RunFailed {
        /// Dockerfile name as given.
        file: String,
        /// Line of the RUN instruction.
        line: usize,
        /// The command's exit status (128+N for a signal).
        code: i32,
    },
    /// Another instruction failed at a Dockerfile line.
    #[error("{file}:{line}: {message}")]
    Step {
        /// Dockerfile name as given.
        file: String,
        /// Line of the instruction.
        line: usize,
        /// What went wrong.
        message: String,
    },
    /// The build context could not be read.
    #[error("build context: {0}")]
    Context(String),
    /// A registry refused or failed; the message names the registry, repository and status.
    #[error(transparent)]
    Registry(#[from] kiln_registry::Error),
    /// A base image could not be used (bad manifest, missing platform, failed unpack), or a
    /// layer could not be made.
    #[error("{0}")]
    Image(String),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The options are inconsistent (for example in-place mode outside a container without `--force`).
    #[error("invalid options: {0}")]
    Options(String),
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
}

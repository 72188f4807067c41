//! The one error type of this crate.
//!
//! Every variant names what failed and where: the context source (with any credentials of its
//! URL already redacted), the path inside it, the `.dockerignore` file and line, or the HTTP
//! status. Callers never need to add location information themselves.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while opening, reading or hashing a build context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The `--context` value could not be understood.
    #[error("invalid build context {spec:?}: {reason}")]
    InvalidSpec {
        /// The context value as given (credentials redacted).
        spec: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The `--git` option string could not be parsed.
    #[error("invalid --git option {option:?}: {reason}")]
    InvalidGitOption {
        /// The offending `key=value` item.
        option: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A filesystem operation failed on a path.
    #[error("{source_name}: cannot {action} {}: {error}", path.display())]
    Io {
        /// The context source being worked on (redacted).
        source_name: String,
        /// What was being done, as a verb phrase ("read", "create directory", ...).
        action: &'static str,
        /// The path the operation was applied to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        error: io::Error,
    },

    /// A local directory context does not exist or is not a directory.
    #[error("{source_name}: {} is not a directory", path.display())]
    NotADirectory {
        /// The context source (redacted).
        source_name: String,
        /// The path that should have been a directory.
        path: PathBuf,
    },

    /// A tar archive contained an entry that would land outside the extraction directory or
    /// that cannot be represented safely.
    #[error("{source_name}: unsafe archive entry {entry:?}: {reason}")]
    UnsafeArchiveEntry {
        /// The context source (redacted).
        source_name: String,
        /// The entry's path as stored in the archive.
        entry: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A tar archive could not be read.
    #[error("{source_name}: cannot read archive: {error}")]
    Archive {
        /// The context source (redacted).
        source_name: String,
        /// The underlying error.
        #[source]
        error: io::Error,
    },

    /// Talking to a git remote or checking out what it sent failed.
    #[error("{source_name}: {action} failed: {message}")]
    Git {
        /// The git source (redacted).
        source_name: String,
        /// What was being done: `ls-remote`, `clone`, `checkout`, `submodule update`.
        action: String,
        /// What went wrong, with its causes (redacted).
        message: String,
    },

    /// An HTTP server answered a context download with a non-success status.
    #[error("{source_name}: GET {url} returned HTTP {status}")]
    HttpStatus {
        /// The context source (redacted).
        source_name: String,
        /// The URL requested (redacted).
        url: String,
        /// The status code.
        status: u16,
    },

    /// An HTTP request failed before or while the body was received.
    #[error("{source_name}: GET {url} failed: {message}")]
    Http {
        /// The context source (redacted).
        source_name: String,
        /// The URL requested (redacted).
        url: String,
        /// The transport error, its causes joined by ": ".
        message: String,
    },

    /// An extra CA certificate given for HTTPS downloads could not be used.
    #[error("cannot use CA certificate {}: {message}", path.display())]
    CaCertificate {
        /// The PEM file.
        path: PathBuf,
        /// Why it was rejected.
        message: String,
    },

    /// `--context-sub-path` points outside the context or to something that isn't a directory.
    #[error("{source_name}: context sub-path {sub_path:?}: {reason}")]
    SubPath {
        /// The context source (redacted).
        source_name: String,
        /// The sub-path as given.
        sub_path: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A `.dockerignore` line is not a valid pattern.
    #[error("{}:{line}: invalid pattern {pattern:?}: {reason}", file.display())]
    IgnorePattern {
        /// The ignore file.
        file: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// The pattern as written.
        pattern: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A COPY/ADD source pattern is malformed.
    #[error("invalid source pattern {pattern:?}: {reason}")]
    SourcePattern {
        /// The pattern as given.
        pattern: String,
        /// Why it was rejected.
        reason: String,
    },

    /// An operation on a path inside a tree (the context, a stage, an image) failed; the
    /// error names the path and the tree's root.
    #[error("{source_name}: {error}")]
    Contained {
        /// The tree being read (redacted).
        source_name: String,
        /// What failed, with the path inside the root.
        #[source]
        error: kiln_fs::resolve::RootError,
    },

    /// A walk or hash was asked for a context-relative path that does not exist (or is
    /// excluded by `.dockerignore`).
    #[error("{path:?}: not found in build context")]
    NotFound {
        /// The context-relative path.
        path: String,
    },
}

impl ContextError {
    /// Shorthand for [`ContextError::Io`].
    pub(crate) fn io(
        source_name: &str,
        action: &'static str,
        path: impl Into<PathBuf>,
        error: io::Error,
    ) -> Self {
        ContextError::Io {
            source_name: source_name.to_owned(),
            action,
            path: path.into(),
            error,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = ContextError> = std::result::Result<T, E>;

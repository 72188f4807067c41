//! The cache's error type.

use std::path::PathBuf;

/// Why a cache operation failed. Lookups and writes are best effort for a build (a failed
/// cache write is a warning, a failed lookup a miss), but the cause is kept for the report.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache repository or a base image's registry refused or failed; the message names
    /// the registry, repository and HTTP status.
    #[error(transparent)]
    Registry(#[from] kiln_registry::Error),
    /// The OCI layout cache failed; the message names the path.
    #[error(transparent)]
    Layout(#[from] kiln_oci::layout::LayoutError),
    /// The base image directory's blob store failed; the message names the path.
    #[error(transparent)]
    BlobStore(#[from] kiln_fs::blobstore::BlobStoreError),
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A stored entry or image is not what Kiln wrote or expects.
    #[error("{location}: {reason}")]
    InvalidEntry {
        /// Where the entry is (`registry/repo:tag`, layout path, blob path).
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// A `--cache-repo` value that is neither `oci:PATH` nor `REGISTRY/REPO`.
    #[error("invalid cache repository {value:?}: {reason}")]
    InvalidRepository {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// An image document could not be built or parsed.
    #[error("{what}: {source}")]
    Image {
        /// Which document.
        what: String,
        /// The cause.
        source: kiln_oci::ImageError,
    },
    /// A background blocking task panicked or was cancelled.
    #[error("{0}: background task failed")]
    Task(String),
}

impl CacheError {
    /// Whether the cache's registry gave no answer at all (connection refused, reset, timed
    /// out, TLS failure, a refused certificate), after the client's retries: asking it again
    /// would only wait again.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CacheError::Registry(
                kiln_registry::Error::Transport { .. } | kiln_registry::Error::Certificate { .. }
            )
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CacheError {
        let path = path.into();
        move |source| CacheError::Io { path, source }
    }

    pub(crate) fn invalid(location: impl ToString, reason: impl ToString) -> CacheError {
        CacheError::InvalidEntry {
            location: location.to_string(),
            reason: reason.to_string(),
        }
    }
}

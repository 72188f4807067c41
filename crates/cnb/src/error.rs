//! The errors of every part of the platform, each naming the file and key, or the buildpack and
//! phase, it is about.

use std::path::PathBuf;

use crate::api::Api;

/// Why a CNB file could not be read or a phase could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A TOML or JSON file does not have the form the spec gives it.
    #[error("{path}: {}{message}", key_prefix(key), path = path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The key path inside the file (`buildpack.version`, `processes[0].command`), empty when
        /// the file is not even well-formed TOML or JSON.
        key: String,
        /// What is wrong, with the line when the parser knows it.
        message: String,
    },
    /// A buildpack declares a Buildpack API this platform does not implement.
    #[error(
        "{path}: buildpack {id} declares Buildpack API {api}, which Kiln does not support (it supports {min} to {max})",
        path = path.display(),
        min = Api::MIN_BUILDPACK,
        max = Api::MAX_BUILDPACK
    )]
    UnsupportedApi {
        /// The buildpack.toml.
        path: PathBuf,
        /// The buildpack's id (or `?` when it has none).
        id: String,
        /// The version it declares.
        api: String,
    },
    /// A buildpack named by an order, group or flag is not in the buildpacks directory.
    #[error("buildpack {id}{} not found in {dir}", version.as_deref().map(|v| format!("@{v}")).unwrap_or_default(), dir = dir.display())]
    BuildpackNotFound {
        /// Its id.
        id: String,
        /// The version asked for, if any.
        version: Option<String>,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// A composite buildpack's order leads back to itself.
    #[error("composite buildpack {0} includes itself through its order")]
    OrderCycle(String),
    /// A component buildpack was expected (in a group) but the buildpack is a composite one.
    #[error(
        "buildpack {0} is a composite buildpack (it has an [[order]]) and cannot run in a group"
    )]
    NotComponent(String),
    /// No group of the order passed detection.
    #[error("{0}")]
    Detection(#[from] crate::detect::DetectionFailed),
    /// A buildpack's `bin/detect` or `bin/build` could not be started.
    #[error("buildpack {id}: {phase}: cannot run {program}: {source}", program = program.display())]
    Spawn {
        /// The buildpack.
        id: String,
        /// `detect` or `build`.
        phase: &'static str,
        /// The executable.
        program: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A buildpack's `bin/build` exited non-zero.
    #[error("buildpack {id}: bin/build failed with {status}{}", if output.is_empty() { String::new() } else { format!("; its output:\n{output}") })]
    BuildFailed {
        /// The buildpack (`id@version`).
        id: String,
        /// How it ended (`exit status 1`, `signal 9`).
        status: String,
        /// Its output, when the platform captured it (empty when it was streamed).
        output: String,
    },
    /// A buildpack's output breaks a rule of the spec that no single key shows.
    #[error("buildpack {id}: {phase}: {message}")]
    Buildpack {
        /// The buildpack (`id@version`).
        id: String,
        /// The phase.
        phase: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The platform's inputs (flags, environment, group) are inconsistent.
    #[error("{0}")]
    Platform(String),
    /// An image's labels or layers do not allow the requested rebase.
    #[error("rebase: {0}")]
    Rebase(String),
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() || key == "." {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

impl From<kiln_cnb_env::Error> for Error {
    fn from(e: kiln_cnb_env::Error) -> Error {
        Error::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error::Io`] for `path`.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

//! Kiln's build engine: everything the `executor` binary can do is a call on this crate.
//!
//! A build is described by [`BuildOptions`] (the library form of kaniko's flags) and run by
//! [`Builder`], which reports what it does as a stream of typed [`BuildEvent`]s delivered to an
//! [`EventSink`]; the binary only renders those events and maps [`BuildError`]s to exit codes.
//!
//! The engine runs a [`kiln_plan::Plan`]: stages of operations (run, copy, mkdir, config edit)
//! that a front end made — the Dockerfile front end (kiln-dockerfile) when the context has a
//! Dockerfile, the buildpacks front end (kiln-cnb) when it has none or buildpacks are asked for
//! ([`BuildOptions::buildpacks`]), or any plan handed to [`Builder::plan`]. [`rebase`] puts an
//! app image built by buildpacks on a new run image without building anything. The context is materialised (kiln-context), the stages the
//! target needs run level by level (independent stages at the same time, each on a blocking
//! thread), base images are pulled into a content-addressed blob store and unpacked
//! (kiln-registry, kiln-fs), runs execute in the sandbox (kiln-sandbox), each step's changes
//! are snapshotted and written as a compressed layer (kiln-fs), and the image is assembled and
//! pushed or written out (kiln-oci). Each operation's key, config edit and execution live in
//! one module of `ops`. A build can be stopped from outside with a [`Cancel`] handle
//! ([`Builder::cancel_with`]): it then tags nothing and leaves no mount or work dir behind.

#![forbid(unsafe_code)]

mod base;
mod builder;
mod buildpacks;
mod cache;
mod cancel;
mod error;
mod events;
mod frontend;
mod inplace;
mod ops;
mod options;
mod output;
mod rebase;
mod remote;
mod shared;
mod stage;
mod timing;
mod trash;

pub use builder::{BuildReport, Builder};
pub use buildpacks::BUILTIN_DIR_ENV;
pub use buildpacks::LIFECYCLE_DIR_ENV;
pub use cancel::Cancel;
pub use error::{BuildError, Cause};
pub use events::{BuildEvent, EventSink, OutputStream, Phase};
pub use options::{
    BuildOptions, BuildpacksOptions, CacheOptions, ContextSpec, FrontEndChoice, GitOptions,
    OutputOptions, SecretSource, SecretSpec, SnapshotOptions, SshSpec, UpperTmpfs,
    UPPER_TMPFS_DEFAULT_CAP,
};
pub use rebase::{rebase, RebaseOptions, RebaseReport};
pub use timing::TimingReport;

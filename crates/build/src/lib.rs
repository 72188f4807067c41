//! Kiln's build engine: everything the `executor` binary can do is a call on this crate.
//!
//! A build is described by [`BuildOptions`] (the library form of kaniko's flags) and run by
//! [`Builder`], which reports what it does as a stream of typed [`BuildEvent`]s delivered to an
//! [`EventSink`]; the binary only renders those events and maps [`BuildError`]s to exit codes.
//!
//! The engine: the context is materialised (kiln-context), the Dockerfile parsed and planned
//! (kiln-dockerfile), the stages the target needs run level by level (independent stages at the
//! same time, each on a blocking thread), base images pulled into a content-addressed blob store
//! and unpacked (kiln-registry, kiln-fs), RUN executed in the sandbox (kiln-sandbox), each step's
//! changes snapshotted and written as a compressed layer (kiln-fs), and the image assembled and
//! pushed or written out (kiln-oci).

pub mod archive;
pub mod base;
pub mod builder;
pub mod cache;
pub mod cache_mount;
pub mod copy;
pub mod error;
pub mod events;
pub mod fetch;
pub mod inplace;
pub mod metadata;
pub mod options;
pub mod output;
pub mod remote;
pub mod run;
pub mod ssh_agent;
pub mod stage;
pub mod timing;

pub use builder::{BuildReport, Builder};
pub use error::BuildError;
pub use events::{BuildEvent, EventSink, OutputStream, Phase};
pub use options::{
    BuildOptions, CacheOptions, ContextSpec, GitOptions, OutputOptions, SecretSource, SecretSpec,
    SnapshotOptions, SshSpec,
};
pub use timing::TimingReport;

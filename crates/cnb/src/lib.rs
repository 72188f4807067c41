//! Kiln's Cloud Native Buildpacks platform: the CNB file formats, the detect and build phases,
//! the export description the engine reads to assemble the image, and rebase.
//!
//! Detect and build run inside the build image through the `kiln-lifecycle` binary of this
//! crate (`kiln-lifecycle detect`, `kiln-lifecycle build`, with the flags and `CNB_*`
//! variables of the Platform API's detector and builder). The build step leaves
//! `<layers>/config/metadata.toml` for the launcher and [`export::ExportDescription`] at
//! `<layers>/kiln-export.json` for the engine, which exports it as a stage on the run image.
//!
//! Buildpack APIs 0.7 to 0.12 are supported; files and labels are written as Platform API 0.12
//! has them.

#![forbid(unsafe_code)]

pub mod api;
pub mod build;
pub mod builder;
pub mod buildpack;
pub mod detect;
/// Environment construction from layer directories (its own crate, shared with the launcher).
pub use kiln_cnb_env as env;
pub mod error;
pub mod export;
pub mod files;
pub mod layer;
pub mod metadata;
pub mod order;
pub mod platform;
pub mod project;
pub mod rebase;

pub use api::Api;
pub use build::{build, BuildConfig, BuildOutcome, OutputMode};
pub use buildpack::{escape_id, read_buildpack, Buildpack, BuildpackKind, BuildpackStore};
pub use detect::{detect, DetectConfig, Detected, DetectionFailed};
pub use error::{Error, Result};
pub use export::{ExportDescription, EXPORT_DESCRIPTION_PATH};
pub use metadata::{BuildMetadata, LifecycleMetadata, LAUNCH_METADATA_PATH};
pub use order::{Group, Order, Plan};
pub use project::{parse_project_toml, ProjectDescriptor};
pub use rebase::{rebase, AppImage, NewRunImage, RebaseOptions, Rebased};

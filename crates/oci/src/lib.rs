//! The image model shared by every Kiln crate that touches images: digests, media types,
//! image references, platforms, the config/manifest/index documents with canonical JSON, and
//! the two on-disk image formats Kiln writes (OCI image layout and docker-archive).
//!
//! This crate sits at the bottom of the dependency graph (see `shared/DESIGN.md`): registry,
//! fs and cache depend on it, it depends on nothing of ours. Everything here is synchronous;
//! blobs move through `Read`/`Write` streams and are never held whole in memory.

#![forbid(unsafe_code)]

pub mod archive;
pub mod canonical;
pub mod digest;
pub mod image;
pub mod interop;
pub mod layout;
pub mod media_type;
pub mod platform;
pub mod reference;

pub use digest::{
    Algorithm, Digest, DigestError, DigestWriter, Hasher, VerifyError, VerifyingReader,
};
pub use image::{
    AnyManifest, ContainerConfig, Descriptor, Healthcheck, History, ImageConfig, ImageError, Index,
    JsonBlob, Manifest, ManifestBuilder, RootFs,
};
pub use media_type::{Compression, ImageFormat, MediaType};
pub use platform::{Platform, PlatformError};
pub use reference::{Reference, ReferenceError};

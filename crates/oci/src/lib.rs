//! The image model shared by every Kiln crate that touches images: content digests today;
//! media types, references, manifests and layouts are added by the image I/O work.
//!
//! This crate sits at the bottom of the dependency graph (see `shared/DESIGN.md`): registry,
//! fs and cache depend on it, it depends on nothing of ours.

pub mod digest;

pub use digest::{Algorithm, Digest, DigestError, DigestWriter, Hasher};

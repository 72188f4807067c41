//! Everything Kiln does to a root filesystem on disk: resolving paths without escaping the root,
//! applying image layers (unpack), finding what a build step changed (snapshots), and turning
//! those changes into compressed, digested layer blobs.
//!
//! Modules are added by the unpack and the snapshot/layer-writer work; each owns one concern.

#![forbid(unsafe_code)]
pub mod blobstore;
pub mod clone;
pub mod compress;
pub mod erofs;
pub mod layer;
pub mod overlay;
pub mod resolve;
pub mod snapshot;
pub mod trees;
pub mod unpack;

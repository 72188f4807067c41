//! The manifest media types a registry may serve, and the `Accept` list Kiln sends.
//!
//! Kept here as plain strings until `kiln-oci` exports its media-type constants; the values are
//! fixed by the OCI image spec and Docker's image manifest v2 schema 2.

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest v2, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (the multi-platform form of schema 2).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest type Kiln can use, in the order a registry should prefer them.
pub const MANIFEST_ACCEPT: [&str; 4] = [
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
];

/// Whether a media type names an index or manifest list rather than a single image.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

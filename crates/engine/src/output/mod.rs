//! The finished image: its config and manifest, and where it goes — registry destinations,
//! an OCI layout, a docker-archive, and the digest files kaniko writes. Local files are written
//! under a temporary name and renamed, and digest files only after every push succeeded, so a
//! failed build leaves nothing half-written behind.

mod assemble;
mod files;
mod push;

pub(crate) use assemble::{assemble, now_rfc3339, Image};
pub(crate) use files::{
    layout_tag, write_digest_files, write_docker_archive, write_file_atomically, write_oci_layout,
};
pub(crate) use push::{push, PlacedBlobs, PushAhead, PushPolicy};

use kiln_fs::blobstore::BlobStore;
use kiln_oci::Reference;
use kiln_registry::Client;

use crate::base::ImageLayer;
use crate::error::BuildError;

/// Parses every `--destination` before anything is built, so a typo fails fast.
pub(crate) fn parse_destinations(destinations: &[String]) -> Result<Vec<Reference>, BuildError> {
    destinations
        .iter()
        .map(|d| {
            Reference::parse(d)
                .map_err(|e| BuildError::Options(format!("invalid --destination {d:?}: {e}")))
        })
        .collect()
}

/// Downloads into the blob store every layer of `layers` that is not there yet, from the
/// repository it came from (a base image's or the cache's).
pub(crate) async fn ensure_local(
    client: &Client,
    blobs: &BlobStore,
    layers: &[ImageLayer],
) -> Result<(), BuildError> {
    for layer in layers {
        if blobs.contains(&layer.descriptor.digest) {
            continue;
        }
        let origin = layer.origin.as_ref().ok_or_else(|| {
            BuildError::image(
                format!("layer {}", layer.descriptor.digest),
                "it is neither in the blob store nor in a known repository",
            )
        })?;
        let file = blobs
            .create()
            .map_err(|e| BuildError::image("blob store", e))?;
        crate::base::fetch_blob(
            client,
            file,
            origin,
            &layer.descriptor,
            &origin.to_string(),
            &|_| {},
            None,
        )
        .await?;
    }
    Ok(())
}

//! Base images: resolving a FROM (or `COPY --from=image`) reference to a manifest for the build
//! platform, pulling its config and layers into the build's blob store, and unpacking them into a
//! stage rootfs while recording the snapshot index, so the first snapshot needs no extra walk.

use std::path::Path;

use futures::future::try_join_all;
use kiln_fs::blobstore::BlobStore;
use kiln_fs::resolve::Root;
use kiln_fs::snapshot::Index;
use kiln_fs::unpack::{unpack_layer_except, UnpackEvent, UnpackOptions};
use kiln_oci::image::{AnyManifest, Descriptor, ImageConfig};
use kiln_oci::{Digest, Platform, Reference};
use kiln_registry::{Client, Repository};
use tokio::io::AsyncReadExt;

use crate::error::BuildError;
use crate::events::BuildEvent;

/// Largest config or manifest document accepted from a registry; real ones are a few KiB.
const MAX_DOCUMENT: u64 = 16 << 20;

/// One layer of an image being built: where it is described, what its uncompressed tar hashes
/// to, and the repository it already lives in (so a push can mount it instead of uploading).
#[derive(Debug, Clone)]
pub struct ImageLayer {
    /// The manifest descriptor (media type, digest, size).
    pub descriptor: Descriptor,
    /// The config's `rootfs.diff_ids` entry.
    pub diff_id: Digest,
    /// A repository that has this blob already (a base image's), for cross-repository mounts.
    pub origin: Option<Repository>,
}

/// A pulled image: its config and layers, with every layer blob in the blob store.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The reference as normalised (`docker.io/library/busybox:latest`).
    pub reference: Reference,
    /// The digest of the platform manifest that was used.
    pub manifest_digest: Digest,
    /// The image config.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<ImageLayer>,
}

/// Fetches `image`'s manifest for `platform`, its config, and every layer blob missing from
/// `blobs`, layers concurrently (the client bounds how many transfers run at once).
pub async fn pull(
    client: &Client,
    blobs: &BlobStore,
    image: &str,
    platform: &Platform,
    emit: &(dyn Fn(BuildEvent) + Send + Sync),
) -> Result<PulledImage, BuildError> {
    let reference = Reference::parse(image)
        .map_err(|e| BuildError::Options(format!("invalid image reference {image:?}: {e}")))?;
    let repo = Repository::new(reference.registry(), reference.repository())?;
    let mut fetched = client
        .get_manifest(&repo, &reference.manifest_reference())
        .await?;
    let manifest = loop {
        match AnyManifest::parse(Some(fetched.media_type.as_str()), &fetched.bytes)
            .map_err(|e| BuildError::Image(format!("{reference}: {e}")))?
        {
            AnyManifest::Manifest(m) => break m,
            AnyManifest::Index(index) => {
                let chosen = platform.select(index.manifests.iter()).ok_or_else(|| {
                    BuildError::Image(format!(
                        "{reference}: no manifest for platform {platform} in the image index"
                    ))
                })?;
                let digest = chosen.digest.to_string();
                fetched = client.get_manifest(&repo, &digest).await?;
            }
        }
    };
    let manifest_digest = fetched.digest.clone();

    let config_bytes = read_small_blob(client, &repo, &manifest.config.digest).await?;
    let config = ImageConfig::from_json(&config_bytes)
        .map_err(|e| BuildError::Image(format!("{reference}: {e}")))?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(BuildError::Image(format!(
            "{reference}: the config lists {} layers but the manifest {}",
            config.rootfs.diff_ids.len(),
            manifest.layers.len()
        )));
    }

    let downloads = manifest.layers.iter().map(|layer| {
        let repo = repo.clone();
        async move { fetch_blob(client, blobs, &repo, layer, image, emit).await }
    });
    try_join_all(downloads).await?;

    let layers = manifest
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .map(|(descriptor, diff_id)| ImageLayer {
            descriptor: descriptor.clone(),
            diff_id: diff_id.clone(),
            origin: Some(repo.clone()),
        })
        .collect();
    Ok(PulledImage {
        reference,
        manifest_digest,
        config,
        layers,
    })
}

async fn read_small_blob(
    client: &Client,
    repo: &Repository,
    digest: &Digest,
) -> Result<Vec<u8>, BuildError> {
    let stream = client.get_blob(repo, digest).await?;
    let mut bytes = Vec::new();
    stream
        .into_async_read()
        .take(MAX_DOCUMENT)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| BuildError::Image(format!("{repo}: reading blob {digest}: {e}")))?;
    Ok(bytes)
}

async fn fetch_blob(
    client: &Client,
    blobs: &BlobStore,
    repo: &Repository,
    layer: &Descriptor,
    image: &str,
    emit: &(dyn Fn(BuildEvent) + Send + Sync),
) -> Result<(), BuildError> {
    if blobs.contains(&layer.digest) {
        return Ok(());
    }
    let stream = client.get_blob(repo, &layer.digest).await?;
    let mut reader = stream.into_async_read();
    let mut file = blobs.create().map_err(store_error)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut done = 0u64;
    let mut last_report = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| BuildError::Image(format!("{repo}: pulling {}: {e}", layer.digest)))?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut file, &buf[..n]).map_err(|source| BuildError::Io {
            path: blobs.root().to_path_buf(),
            source,
        })?;
        done += n as u64;
        if done - last_report >= 4 << 20 {
            last_report = done;
            emit(BuildEvent::PullProgress {
                image: image.to_owned(),
                digest: layer.digest.clone(),
                done,
                total: layer.size,
            });
        }
    }
    // The registry stream has verified the digest by the time it ends without error.
    file.commit(&layer.digest).map_err(store_error)?;
    emit(BuildEvent::PullProgress {
        image: image.to_owned(),
        digest: layer.digest.clone(),
        done,
        total: layer.size,
    });
    Ok(())
}

fn store_error(e: kiln_fs::blobstore::BlobStoreError) -> BuildError {
    BuildError::Image(format!("blob store: {e}"))
}

/// Unpacks `layers` (bottom first, all present in `blobs`) into the directory `rootfs`,
/// recording every written path in `index` (which is sealed at the end).
pub fn unpack_into(
    rootfs: &Path,
    layers: &[ImageLayer],
    blobs: &BlobStore,
    index: &mut Index,
) -> Result<(), BuildError> {
    unpack_into_except(rootfs, layers, blobs, index, None)
}

/// [`unpack_into`] that leaves alone the paths (relative to `rootfs`) for which `skip` is true
/// (see [`kiln_fs::unpack::unpack_layer_except`]).
pub fn unpack_into_except(
    rootfs: &Path,
    layers: &[ImageLayer],
    blobs: &BlobStore,
    index: &mut Index,
    skip: Option<&dyn Fn(&Path) -> bool>,
) -> Result<(), BuildError> {
    let root = Root::open(rootfs).map_err(|e| BuildError::Image(format!("{e}")))?;
    for layer in layers {
        let path = blobs.blob_path(&layer.descriptor.digest);
        let file = std::fs::File::open(&path).map_err(|source| BuildError::Io {
            path: path.clone(),
            source,
        })?;
        let mut record = |event: UnpackEvent<'_>| match event {
            UnpackEvent::Written { path, metadata } => index.record(path, metadata),
            UnpackEvent::Removed { path } => index.forget(path),
        };
        let options = UnpackOptions {
            diff_id: Some(&layer.diff_id),
            on_event: Some(&mut record),
        };
        unpack_layer_except(
            &root,
            std::io::BufReader::with_capacity(1 << 20, file),
            &layer.descriptor.digest,
            options,
            skip,
        )
        .map_err(|e| BuildError::Image(e.to_string()))?;
    }
    index.seal(rootfs).map_err(|source| BuildError::Io {
        path: rootfs.to_path_buf(),
        source,
    })
}

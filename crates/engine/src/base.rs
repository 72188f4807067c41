//! Base images: resolving a FROM (or `COPY --from=image`) reference to a manifest for the build
//! platform, pulling its config and layers into the build's blob store, and unpacking them into a
//! stage rootfs while recording the snapshot index, so the first snapshot needs no extra walk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use futures::future::try_join_all;
use kiln_fs::blobstore::{BlobFile, BlobStore};
use kiln_fs::resolve::Root;
use kiln_fs::snapshot::Index;
use kiln_fs::unpack::{unpack_layer_except, UnpackEvent, UnpackOptions};
use kiln_oci::image::{AnyManifest, Descriptor, ImageConfig, Manifest};
use kiln_oci::{Digest, DigestWriter, Platform, Reference};
use kiln_registry::{Client, Repository};
use tokio::io::AsyncReadExt;

use crate::cancel::Cancel;
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink};

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
    /// The config document as fetched (what its digest covers).
    pub config_bytes: Vec<u8>,
    /// Layers, bottom first.
    pub layers: Vec<ImageLayer>,
}

/// Takes base layers from `--cache-dir` (filled by `executor warm`) instead of the registry:
/// each blob found there is hard-linked (or copied) into the build's blob store. A cache
/// directory that cannot be read is no error: the layers are pulled as usual.
pub fn link_from_cache_dir(cache_dir: Option<&Path>, blobs: &BlobStore, layers: &[Descriptor]) {
    let Some(dir) = cache_dir else {
        return;
    };
    let Ok(cached) = BlobStore::open(dir) else {
        return;
    };
    for layer in layers {
        if blobs.contains(&layer.digest) || !cached.contains(&layer.digest) {
            continue;
        }
        let from = cached.blob_path(&layer.digest);
        let to = blobs.blob_path(&layer.digest);
        // The warmer verified the blob when it stored it under its digest.
        match std::fs::hard_link(&from, &to) {
            Ok(()) => {}
            // Another build sharing the blob store linked it first.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            // Another file system: copied under a name of its own and renamed into place, so
            // builds copying the same blob at once never write into one file.
            Err(_) => copy_into_store(&from, blobs, &layer.digest),
        }
    }
}

/// Copies the stored blob at `from` into `blobs` under `digest`; a blob that cannot be copied
/// is left to the registry pull.
fn copy_into_store(from: &Path, blobs: &BlobStore, digest: &Digest) {
    let Ok(mut source) = std::fs::File::open(from) else {
        return;
    };
    let Ok(mut file) = blobs.create() else {
        return;
    };
    // Dropping an uncommitted file removes it.
    if std::io::copy(&mut source, &mut file).is_ok() {
        let _ = file.commit(digest);
    }
}

/// An image's manifest for the build platform and its config, resolved but with no layer
/// fetched yet.
struct Resolved {
    reference: Reference,
    repo: Repository,
    manifest_digest: Digest,
    layers: Vec<Descriptor>,
    config: ImageConfig,
    config_bytes: Vec<u8>,
}

impl Resolved {
    fn into_pulled(self) -> PulledImage {
        let layers = self
            .layers
            .iter()
            .zip(&self.config.rootfs.diff_ids)
            .map(|(descriptor, diff_id)| ImageLayer {
                descriptor: descriptor.clone(),
                diff_id: diff_id.clone(),
                origin: Some(self.repo.clone()),
            })
            .collect();
        PulledImage {
            reference: self.reference,
            manifest_digest: self.manifest_digest,
            config: self.config,
            config_bytes: self.config_bytes,
            layers,
        }
    }
}

/// An image reference resolved to its manifest for the build platform; the config is not
/// fetched yet, so a caller that may already hold it (a stage record of the layer cache) can
/// ask for it at the same time as the manifest.
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    reference: Reference,
    repo: Repository,
    manifest_digest: Digest,
    manifest: Manifest,
}

impl ResolvedManifest {
    /// The digest of the platform manifest.
    pub fn digest(&self) -> &Digest {
        &self.manifest_digest
    }

    /// The manifest's media type (OCI or Docker), as the registry served it.
    pub fn media_type(&self) -> String {
        match &self.manifest.media_type {
            Some(media_type) => media_type.as_str().to_owned(),
            None => String::new(),
        }
    }

    /// The digest of the config the manifest names.
    pub fn config_digest(&self) -> &Digest {
        &self.manifest.config.digest
    }

    /// Completes the resolution with the image config: `known` when its digest is the one the
    /// manifest names, otherwise fetched from the registry.
    pub async fn with_config(
        self,
        client: &Client,
        known: Option<&[u8]>,
    ) -> Result<PulledImage, BuildError> {
        Ok(self.finish(client, known).await?.into_pulled())
    }

    async fn finish(self, client: &Client, known: Option<&[u8]>) -> Result<Resolved, BuildError> {
        let reference = self.reference;
        let config_digest = &self.manifest.config.digest;
        let config_bytes = match known.filter(|bytes| {
            let mut hasher = config_digest.hasher();
            hasher.update(bytes);
            hasher.finish() == *config_digest
        }) {
            Some(bytes) => bytes.to_vec(),
            None => read_small_blob(client, &self.repo, config_digest).await?,
        };
        let config = ImageConfig::from_json(&config_bytes)
            .map_err(|e| BuildError::image(reference.to_string(), e))?;
        if config.rootfs.diff_ids.len() != self.manifest.layers.len() {
            return Err(BuildError::image(
                reference.to_string(),
                format!(
                    "the config lists {} layers but the manifest {}",
                    config.rootfs.diff_ids.len(),
                    self.manifest.layers.len()
                ),
            ));
        }
        Ok(Resolved {
            reference,
            repo: self.repo,
            manifest_digest: self.manifest_digest,
            layers: self.manifest.layers,
            config,
            config_bytes,
        })
    }
}

/// Resolves `image` to its manifest for `platform` (following an index), without its config.
pub async fn resolve_manifest(
    client: &Client,
    image: &str,
    platform: &Platform,
) -> Result<ResolvedManifest, BuildError> {
    let reference = Reference::parse(image)
        .map_err(|e| BuildError::Options(format!("invalid image reference {image:?}: {e}")))?;
    let repo = Repository::new(reference.registry(), reference.repository())?;
    let mut fetched = client
        .get_manifest(&repo, &reference.manifest_reference())
        .await?;
    let manifest = loop {
        match AnyManifest::parse(Some(fetched.media_type.as_str()), &fetched.bytes)
            .map_err(|e| BuildError::image(reference.to_string(), e))?
        {
            AnyManifest::Manifest(m) => break m,
            AnyManifest::Index(index) => {
                let chosen = platform.select(index.manifests.iter()).ok_or_else(|| {
                    BuildError::image(
                        reference.to_string(),
                        format!("no manifest for platform {platform} in the image index"),
                    )
                })?;
                let digest = chosen.digest.to_string();
                fetched = client.get_manifest(&repo, &digest).await?;
            }
        }
    };
    Ok(ResolvedManifest {
        reference,
        repo,
        manifest_digest: fetched.digest,
        manifest,
    })
}

async fn resolve(
    client: &Client,
    image: &str,
    platform: &Platform,
) -> Result<Resolved, BuildError> {
    resolve_manifest(client, image, platform)
        .await?
        .finish(client, None)
        .await
}

/// Fetches `image`'s manifest for `platform`, its config, and every layer blob missing from
/// `blobs`, layers concurrently (the client bounds how many transfers run at once).
pub async fn pull(
    client: &Client,
    blobs: &BlobStore,
    image: &str,
    platform: &Platform,
    emit: &(dyn Fn(BuildEvent) + Send + Sync),
    cache_dir: Option<&Path>,
) -> Result<PulledImage, BuildError> {
    let manifest = resolve_manifest(client, image, platform).await?;
    pull_resolved(client, blobs, manifest, image, emit, cache_dir).await
}

/// Like [`pull`] for an image whose manifest is already resolved (pinned while keying);
/// `image` is the name that events and errors give it.
pub async fn pull_resolved(
    client: &Client,
    blobs: &BlobStore,
    manifest: ResolvedManifest,
    image: &str,
    emit: &(dyn Fn(BuildEvent) + Send + Sync),
    cache_dir: Option<&Path>,
) -> Result<PulledImage, BuildError> {
    let resolved = manifest.finish(client, None).await?;
    link_from_cache_dir(cache_dir, blobs, &resolved.layers);
    let downloads = resolved.layers.iter().map(|layer| async {
        if blobs.contains(&layer.digest) {
            return Ok(());
        }
        let file = blobs.create().map_err(store_error)?;
        fetch_blob(client, file, &resolved.repo, layer, image, emit, None).await
    });
    try_join_all(downloads).await?;
    Ok(resolved.into_pulled())
}

/// Pulls `image` and unpacks it into `rootfs` at the same time: every missing layer downloads
/// concurrently into the blob store while the unpacker follows each one, bottom first, reading
/// the bytes as they land. Blocking: call from a blocking thread; registry I/O runs on
/// `runtime`. Every written path is recorded in `index`, which is sealed at the end.
#[allow(clippy::too_many_arguments)]
pub fn pull_and_unpack(
    runtime: &tokio::runtime::Handle,
    cancel: &Cancel,
    client: &Client,
    blobs: &BlobStore,
    image: &str,
    platform: &Platform,
    events: &EventSink,
    rootfs: &Path,
    index: &mut Index,
    cache_dir: Option<&Path>,
) -> Result<PulledImage, BuildError> {
    let resolved = cancel.block_on(runtime, resolve(client, image, platform))??;
    link_from_cache_dir(cache_dir, blobs, &resolved.layers);
    let mut sources = Vec::with_capacity(resolved.layers.len());
    let mut downloads = Vec::new();
    for layer in &resolved.layers {
        let final_path = blobs.blob_path(&layer.digest);
        let mut in_flight = IN_FLIGHT.lock().expect("in-flight downloads");
        // Two stages on the same base: the second follows the first one's download.
        if let Some((temp, progress)) = in_flight.get(&final_path) {
            if let Ok(reader) = FollowingReader::open(temp, progress.clone()) {
                sources.push(LayerSource::Following(reader));
                continue;
            }
        }
        if blobs.contains(&layer.digest) {
            let file = std::fs::File::open(&final_path).map_err(|source| BuildError::Io {
                path: final_path,
                source,
            })?;
            sources.push(LayerSource::Stored(file));
            continue;
        }
        let file = blobs.create().map_err(store_error)?;
        let progress = Arc::new(Progress::default());
        let reader = FollowingReader::open(file.temp_path(), progress.clone())?;
        sources.push(LayerSource::Following(reader));
        in_flight.insert(
            final_path.clone(),
            (file.temp_path().to_path_buf(), progress.clone()),
        );
        drop(in_flight);
        let registered = InFlight(final_path);
        let (client, repo, layer, image, events, cancel) = (
            client.clone(),
            resolved.repo.clone(),
            layer.clone(),
            image.to_owned(),
            events.clone(),
            cancel.clone(),
        );
        downloads.push(runtime.spawn(async move {
            let _registered = registered;
            let _finish_on_drop = FinishOnDrop(progress.clone());
            // A cancelled download ends here, which also wakes the unpacker following it.
            let fetched = fetch_blob(
                &client,
                file,
                &repo,
                &layer,
                &image,
                &*events,
                Some(&progress),
            );
            let result = cancel.guard(fetched).await.and_then(|fetched| fetched);
            progress.finish(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            result
        }));
    }
    let unpacked = unpack_sources(rootfs, &resolved, sources, index, blobs, cancel);
    // The downloads' own errors say more (registry, status) than the unpacker's view of them.
    for download in downloads {
        if unpacked.is_err() || cancel.is_cancelled() {
            download.abort();
        }
        match runtime.block_on(download) {
            Ok(Err(e)) => return Err(e),
            Err(e) if e.is_panic() => {
                return Err(BuildError::image(
                    "a layer download",
                    format!("panicked: {e}"),
                ))
            }
            _ => {}
        }
    }
    unpacked?;
    Ok(resolved.into_pulled())
}

/// Drops a stored blob whose bytes no longer match its digest (a disk fault, a half-copied
/// cache directory), so the next pull downloads it again instead of failing on it forever.
fn evict_if_damaged(blobs: &BlobStore, digest: &Digest) {
    let path = blobs.blob_path(digest);
    let matches = std::fs::File::open(&path).and_then(|mut file| {
        let mut hasher = DigestWriter::new(std::io::sink(), digest.algorithm());
        std::io::copy(&mut file, &mut hasher)?;
        let (_, actual, _) = hasher.finish();
        Ok(actual == *digest)
    });
    if matches!(matches, Ok(false)) {
        let _ = std::fs::remove_file(&path);
    }
}

enum LayerSource {
    Stored(std::fs::File),
    Following(FollowingReader),
}

fn unpack_sources(
    rootfs: &Path,
    resolved: &Resolved,
    sources: Vec<LayerSource>,
    index: &mut Index,
    blobs: &BlobStore,
    cancel: &Cancel,
) -> Result<(), BuildError> {
    let root =
        Root::open(rootfs).map_err(|e| BuildError::image(rootfs.display().to_string(), e))?;
    for ((source, layer), diff_id) in sources
        .into_iter()
        .zip(&resolved.layers)
        .zip(&resolved.config.rootfs.diff_ids)
    {
        let stored = matches!(source, LayerSource::Stored(_));
        let reader: Box<dyn std::io::Read> = match source {
            LayerSource::Stored(file) => Box::new(cancel.reader(file)),
            LayerSource::Following(reader) => Box::new(cancel.reader(reader)),
        };
        let unpacked = unpack_one(&root, reader, &layer.digest, diff_id, index, None);
        if unpacked.is_err() && stored && !cancel.is_cancelled() {
            evict_if_damaged(blobs, &layer.digest);
        }
        unpacked?;
    }
    index.seal(rootfs).map_err(|source| BuildError::Io {
        path: rootfs.to_path_buf(),
        source,
    })
}

fn unpack_one(
    root: &Root,
    reader: impl std::io::Read,
    digest: &Digest,
    diff_id: &Digest,
    index: &mut Index,
    skip: Option<&dyn Fn(&Path) -> bool>,
) -> Result<(), BuildError> {
    let mut record = |event: UnpackEvent<'_>| match event {
        UnpackEvent::Written { path, metadata } => index.record(path, metadata),
        UnpackEvent::Removed { path } => index.forget(path),
    };
    let options = UnpackOptions {
        diff_id: Some(diff_id),
        on_event: Some(&mut record),
    };
    unpack_layer_except(
        root,
        std::io::BufReader::with_capacity(1 << 20, reader),
        digest,
        options,
        skip,
    )
    .map(drop)
    .map_err(|e| {
        let what = format!(
            "unpacking base layer {digest} into {}",
            root.path().display()
        );
        BuildError::image(what, e)
    })
}

/// How far a download has got, shared with the reader that follows it.
#[derive(Default)]
pub(crate) struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProgressState {
    /// Bytes flushed to the file so far.
    written: u64,
    /// Set when the download ended: `Ok` once the blob is complete and verified.
    outcome: Option<Result<(), String>>,
}

impl Progress {
    fn advance(&self, written: u64) {
        self.state.lock().expect("download progress").written = written;
        self.changed.notify_all();
    }

    /// Records how the download ended; the first outcome stands.
    fn finish(&self, outcome: Result<(), String>) {
        self.state
            .lock()
            .expect("download progress")
            .outcome
            .get_or_insert(outcome);
        self.changed.notify_all();
    }
}

/// Blob downloads in progress in this process, by the blob's final path in its store: the
/// temporary file being written and its progress, for a second reader to follow.
static IN_FLIGHT: Mutex<std::collections::BTreeMap<PathBuf, (PathBuf, Arc<Progress>)>> =
    Mutex::new(std::collections::BTreeMap::new());

/// Removes a download from [`IN_FLIGHT`] when its task ends in any way.
struct InFlight(PathBuf);

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .expect("in-flight downloads")
            .remove(&self.0);
    }
}

/// Ends a download's progress when its task ends in any way (a panic or an abort included),
/// so the reader following it never waits forever.
struct FinishOnDrop(Arc<Progress>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish(Err("the layer download stopped".to_owned()));
    }
}

/// Reads a blob file while its download is still writing it: at the end of what is there it
/// waits for more, and it reports end of file only once the download has finished.
struct FollowingReader {
    file: std::fs::File,
    position: u64,
    progress: Arc<Progress>,
}

impl FollowingReader {
    fn open(path: &Path, progress: Arc<Progress>) -> Result<FollowingReader, BuildError> {
        let file = std::fs::File::open(path).map_err(|source| BuildError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FollowingReader {
            file,
            position: 0,
            progress,
        })
    }
}

impl std::io::Read for FollowingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.file.read(buf)?;
            if n > 0 {
                self.position += n as u64;
                return Ok(n);
            }
            let mut state = self.progress.state.lock().expect("download progress");
            loop {
                if state.written > self.position {
                    break;
                }
                match &state.outcome {
                    Some(Ok(())) => return Ok(0),
                    Some(Err(e)) => return Err(std::io::Error::other(e.clone())),
                    None => {}
                }
                state = self
                    .progress
                    .changed
                    .wait(state)
                    .expect("download progress");
            }
        }
    }
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
        .map_err(|e| BuildError::image(format!("{repo}: reading blob {digest}"), e))?;
    Ok(bytes)
}

pub(crate) async fn fetch_blob(
    client: &Client,
    mut file: BlobFile,
    repo: &Repository,
    layer: &Descriptor,
    image: &str,
    emit: &(dyn Fn(BuildEvent) + Send + Sync),
    progress: Option<&Progress>,
) -> Result<(), BuildError> {
    let stream = client.get_blob(repo, &layer.digest).await?;
    let mut reader = stream.into_async_read();
    let mut buf = vec![0u8; 256 << 10];
    let mut done = 0u64;
    let mut last_report = 0u64;
    let temp_path = file.temp_path().to_path_buf();
    let write_error = |source| BuildError::Image {
        what: format!(
            "pulling {repo}@{} into {}",
            layer.digest,
            temp_path.display()
        ),
        source: Box::new(source),
    };
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| BuildError::image(format!("{repo}: pulling {}", layer.digest), e))?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut file, &buf[..n]).map_err(write_error)?;
        done += n as u64;
        if let Some(progress) = progress {
            // The follower reads the file, so what it may read must have left the buffer.
            std::io::Write::flush(&mut file).map_err(write_error)?;
            progress.advance(done);
        }
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
    BuildError::image("blob store", e)
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
    let root =
        Root::open(rootfs).map_err(|e| BuildError::image(rootfs.display().to_string(), e))?;
    for layer in layers {
        let path = blobs.blob_path(&layer.descriptor.digest);
        let file = std::fs::File::open(&path).map_err(|source| BuildError::Io {
            path: path.clone(),
            source,
        })?;
        unpack_one(
            &root,
            file,
            &layer.descriptor.digest,
            &layer.diff_id,
            index,
            skip,
        )?;
    }
    index.seal(rootfs).map_err(|source| BuildError::Io {
        path: rootfs.to_path_buf(),
        source,
    })
}

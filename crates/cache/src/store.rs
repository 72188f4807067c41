//! Where step cache entries live: a registry repository (`--cache-repo REGISTRY/REPO`) or an
//! OCI image layout (`--cache-repo oci:/path`).
//!
//! # Entry format
//!
//! One entry per [`CacheKey`], stored as a single-platform OCI image manifest tagged with
//! [`CacheKey::tag`]:
//!
//! - `layers`: the step's layer (compressed blob, OCI media type), or none for a step that
//!   changed only metadata;
//! - `config`: an ordinary OCI image config whose `config` is the container config *after* the
//!   step (so a hit restores ENV, USER, CMD, ... without replaying anything), whose
//!   `rootfs.diff_ids` holds the layer's diff id (or nothing) and whose `history` holds the
//!   step's one history entry;
//! - annotations: [`ANNOTATION_KEY`] (the key, checked on read), [`ANNOTATION_CREATED_UNIX`]
//!   (creation time in Unix seconds, for the TTL) and the standard
//!   `org.opencontainers.image.created`.
//!
//! An entry is therefore a valid image that `skopeo inspect` understands, and its layer blob is
//! the very blob the destination image uses, so pushing it costs a cross-repository mount.
//! Entries older than the TTL are misses; a later write under the same tag replaces them, and
//! [`CacheStore::prune`](crate::prune) deletes them (`executor cache prune`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kiln_oci::image::{rfc3339_utc, ANNOTATION_CREATED};
use kiln_oci::layout::{OciLayout, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE};
use kiln_oci::{
    ContainerConfig, Descriptor, Digest, History, ImageConfig, ImageFormat, Manifest,
    ManifestBuilder, Platform, Reference,
};
use kiln_registry::{
    BoxAsyncRead, BytesSource, Client, FileSource, PushBlobOptions, PushOutcome, Repository,
};

use crate::clock::{Clock, SystemClock};
use crate::error::CacheError;

/// The largest entry config carried inside its manifest (see [`EntryDocuments::build`]).
const MAX_INLINE_CONFIG: usize = 16 * 1024;
use crate::key::CacheKey;

/// Manifest annotation holding the entry's key (`sha256:...`).
pub const ANNOTATION_KEY: &str = "dev.kiln.cache.key";
/// Manifest annotation holding the entry's creation time in seconds since the Unix epoch.
pub const ANNOTATION_CREATED_UNIX: &str = "dev.kiln.cache.created-unix";
/// kaniko's and Kiln's default `--cache-ttl`: two weeks.
pub const DEFAULT_TTL: Duration = Duration::from_secs(14 * 24 * 3600);

/// A step's layer as a cache entry holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedLayer {
    /// The compressed blob (OCI media type; convert with `MediaType::in_format` for a Docker
    /// format image), its digest and size.
    pub descriptor: Descriptor,
    /// The digest of the uncompressed tar, for the image config's `rootfs.diff_ids`.
    pub diff_id: Digest,
}

/// A cache hit: what a step produced when it last ran.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheEntry {
    /// The step's key.
    pub key: CacheKey,
    /// The step's layer, or `None` for a metadata-only step.
    pub layer: Option<CachedLayer>,
    /// The container config after the step.
    pub config: ContainerConfig,
    /// The step's history entry (its `empty_layer` matches `layer`).
    pub history: History,
    /// When the entry was written.
    pub created: SystemTime,
    /// The digest of the entry's manifest.
    pub manifest_digest: Digest,
}

/// A step's layer to store: the compressed blob on local disk.
#[derive(Clone, Debug)]
pub struct LayerFile {
    /// The blob's descriptor (media type, digest, size); any layer media type.
    pub descriptor: Descriptor,
    /// The uncompressed tar's digest.
    pub diff_id: Digest,
    /// Where the compressed blob is (e.g. in the build's blob store).
    pub path: PathBuf,
    /// A repository on the cache's registry that already has the blob (the destination, once
    /// pushed), so the registry backend mounts it instead of uploading it again.
    pub mount_from: Option<Repository>,
}

/// An entry to write after a step ran.
#[derive(Clone, Debug)]
pub struct NewEntry {
    /// The step's key.
    pub key: CacheKey,
    /// The platform the step was built for (the entry's config carries it).
    pub platform: Platform,
    /// The step's layer, or `None` for a metadata-only step.
    pub layer: Option<LayerFile>,
    /// The container config after the step.
    pub config: ContainerConfig,
    /// The step's history entry.
    pub history: History,
}

/// What [`CacheStore::store`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEntry {
    /// The entry, as a later lookup returns it.
    pub entry: CacheEntry,
    /// How the layer blob got into the cache: already there, mounted from
    /// [`LayerFile::mount_from`], or uploaded (copied, for a layout). `None` without a layer.
    pub layer_transfer: Option<PushOutcome>,
}

/// A step cache in a registry repository or an OCI layout. Cloning is cheap; clones share the
/// registry client.
#[derive(Clone, Debug)]
pub struct CacheStore {
    pub(crate) backend: Backend,
    ttl: Duration,
    /// What entries are stamped and aged with.
    pub(crate) clock: Arc<dyn Clock>,
}

#[derive(Clone, Debug)]
pub(crate) enum Backend {
    Registry { client: Client, repo: Repository },
    Layout(Arc<OciLayout>),
}

impl CacheStore {
    /// A cache in a registry repository, with entries older than `ttl` treated as misses.
    pub fn registry(client: Client, repo: Repository, ttl: Duration) -> CacheStore {
        CacheStore {
            backend: Backend::Registry { client, repo },
            ttl,
            clock: Arc::new(SystemClock),
        }
    }

    /// A cache in the OCI layout at `path`, created if missing.
    pub fn oci_layout(path: impl AsRef<Path>, ttl: Duration) -> Result<CacheStore, CacheError> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(CacheError::io(path))?;
        // Two builds creating the same layout at once must not both write an empty index.json
        // after one of them already tagged an entry.
        let layout = {
            let _lock = lock_index(path)?;
            OciLayout::create(path)?
        };
        Ok(CacheStore {
            backend: Backend::Layout(Arc::new(layout)),
            ttl,
            clock: Arc::new(SystemClock),
        })
    }

    /// The cache a `--cache-repo` value names: `oci:PATH` for a layout, `REGISTRY/REPO`
    /// otherwise (a tag or digest in the value is refused: entries are tagged by key).
    pub fn open(value: &str, client: &Client, ttl: Duration) -> Result<CacheStore, CacheError> {
        if let Some(path) = value.strip_prefix("oci:") {
            if path.is_empty() {
                return Err(CacheError::InvalidRepository {
                    value: value.to_owned(),
                    reason: "oci: needs a directory path".to_owned(),
                });
            }
            return CacheStore::oci_layout(path, ttl);
        }
        // Parsing adds the default tag, so look for a tag or digest in the text itself: a `:`
        // after the last `/` is a tag (a registry port always has a `/` after it).
        let last_component = value.rsplit('/').next().unwrap_or(value);
        if value.contains('@') || last_component.contains(':') {
            return Err(CacheError::InvalidRepository {
                value: value.to_owned(),
                reason: "name a repository without a tag or digest".to_owned(),
            });
        }
        let reference = Reference::parse(value).map_err(|e| CacheError::InvalidRepository {
            value: value.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(CacheStore::registry(
            client.clone(),
            Repository::from(&reference),
            ttl,
        ))
    }

    /// kaniko's default cache repository for a destination: `<destination repo>/cache`.
    pub fn default_repository(destination: &Reference) -> Result<Repository, CacheError> {
        Ok(Repository::new(
            destination.registry(),
            format!("{}/cache", destination.repository()),
        )?)
    }

    /// The registry repository of a registry cache (`None` for a layout): the engine can mount
    /// cached layers from it into the destination.
    pub fn repository(&self) -> Option<&Repository> {
        match &self.backend {
            Backend::Registry { repo, .. } => Some(repo),
            Backend::Layout(_) => None,
        }
    }

    /// Where the cache is, for messages: `registry/repo` or `oci:PATH`.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Registry { repo, .. } => repo.to_string(),
            Backend::Layout(layout) => format!("oci:{}", layout.path().display()),
        }
    }

    /// The entry time-to-live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The same cache, reading the time from `clock` to stamp what it writes and to age what
    /// it reads (the system clock otherwise).
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> CacheStore {
        CacheStore { clock, ..self }
    }

    /// Looks up one key: `Ok(None)` on a miss (absent or expired).
    pub async fn lookup(&self, key: &CacheKey) -> Result<Option<CacheEntry>, CacheError> {
        match &self.backend {
            Backend::Registry { client, repo } => {
                registry_lookup(client, repo, key, self.ttl, &*self.clock).await
            }
            Backend::Layout(layout) => {
                let layout = layout.clone();
                let key = key.clone();
                let ttl = self.ttl;
                let clock = self.clock.clone();
                blocking("cache lookup", move || {
                    layout_lookup(&layout, &key, ttl, &*clock)
                })
                .await
            }
        }
    }

    /// Looks up many keys at once (all requests in flight together); the results are in the
    /// order of `keys`. Used to probe all of a stage's keys in one round.
    pub async fn lookup_all(
        &self,
        keys: &[CacheKey],
    ) -> Vec<Result<Option<CacheEntry>, CacheError>> {
        futures::future::join_all(keys.iter().map(|key| self.lookup(key))).await
    }

    /// Writes an entry (its layer blob, config and manifest, then the tag) and returns it as a
    /// later lookup will. An entry under the same key is replaced.
    pub async fn store(&self, entry: &NewEntry) -> Result<StoredEntry, CacheError> {
        let created = self.clock.now();
        let documents = EntryDocuments::build(entry, created)?;
        let layer_transfer = match &self.backend {
            Backend::Registry { client, repo } => {
                let mut transfer = None;
                if let Some(layer) = &entry.layer {
                    let source = FileSource::new(&layer.path)
                        .await
                        .map_err(CacheError::io(&layer.path))?;
                    let pushed = client
                        .push_blob(
                            repo,
                            &source,
                            &PushBlobOptions {
                                digest: Some(layer.descriptor.digest.clone()),
                                mount_from: layer.mount_from.clone(),
                            },
                        )
                        .await?;
                    transfer = Some(pushed.outcome);
                }
                let config = Bytes::from(documents.config.bytes.clone());
                client
                    .push_blob(
                        repo,
                        &BytesSource(config),
                        &PushBlobOptions {
                            digest: Some(documents.config.digest.clone()),
                            mount_from: None,
                        },
                    )
                    .await?;
                client
                    .put_manifest(
                        repo,
                        &entry.key.tag(),
                        &documents.manifest.media_type,
                        Bytes::from(documents.manifest.bytes.clone()),
                    )
                    .await?;
                transfer
            }
            Backend::Layout(layout) => {
                let layout = layout.clone();
                let layer = entry.layer.clone();
                let tag = entry.key.tag();
                let manifest = documents.manifest.clone();
                let config = documents.config.clone();
                blocking("cache write", move || {
                    let transfer = match layer {
                        Some(layer) if layout.has_blob(&layer.descriptor.digest) => {
                            Some(PushOutcome::AlreadyPresent)
                        }
                        Some(layer) => {
                            let file =
                                File::open(&layer.path).map_err(CacheError::io(&layer.path))?;
                            layout.write_blob(file, Some(&layer.descriptor.digest))?;
                            Some(PushOutcome::Uploaded)
                        }
                        None => None,
                    };
                    layout.write_json_blob(&config)?;
                    let descriptor = layout.write_json_blob(&manifest)?;
                    tag_locked(&layout, &tag, descriptor)?;
                    Ok(transfer)
                })
                .await?
            }
        };
        let entry = CacheEntry {
            key: entry.key.clone(),
            layer: documents.layer,
            config: entry.config.clone(),
            history: documents.history,
            created: UNIX_EPOCH + Duration::from_secs(unix_seconds(created)),
            manifest_digest: documents.manifest.digest,
        };
        Ok(StoredEntry {
            entry,
            layer_transfer,
        })
    }

    /// Streams a cached layer's compressed blob (from the registry, verified against its
    /// digest as it arrives, or from the layout's blob file).
    pub async fn open_layer(&self, layer: &CachedLayer) -> Result<BoxAsyncRead, CacheError> {
        match &self.backend {
            Backend::Registry { client, repo } => {
                let stream = client.get_blob(repo, &layer.descriptor.digest).await?;
                Ok(Box::new(stream.into_async_read()))
            }
            Backend::Layout(layout) => {
                let path = layout.blob_path(&layer.descriptor.digest);
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(CacheError::io(&path))?;
                Ok(Box::new(VerifyingFile {
                    file,
                    hasher: Some(layer.descriptor.digest.hasher()),
                    expected: layer.descriptor.digest.clone(),
                    path,
                }))
            }
        }
    }
}

/// A layout blob read asynchronously and checked against its digest at end of file, so a
/// corrupted cache layer fails the step instead of being unpacked silently.
struct VerifyingFile {
    file: tokio::fs::File,
    hasher: Option<kiln_oci::Hasher>,
    expected: Digest,
    path: PathBuf,
}

impl tokio::io::AsyncRead for VerifyingFile {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.file).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    if let Some(hasher) = &mut this.hasher {
                        hasher.update(new);
                    }
                } else if let Some(hasher) = this.hasher.take() {
                    let actual = hasher.finish();
                    if actual != this.expected {
                        return std::task::Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "{}: content is {actual}, not {}",
                                this.path.display(),
                                this.expected
                            ),
                        )));
                    }
                }
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// The serialised documents of one entry.
struct EntryDocuments {
    config: kiln_oci::JsonBlob,
    manifest: kiln_oci::JsonBlob,
    layer: Option<CachedLayer>,
    history: History,
}

impl EntryDocuments {
    fn build(entry: &NewEntry, created: SystemTime) -> Result<EntryDocuments, CacheError> {
        let seconds = unix_seconds(created);
        let created_text = rfc3339_utc(seconds as i64);
        let mut image = ImageConfig::new(&entry.platform);
        image.created = Some(created_text.clone());
        image.config = entry.config.clone();
        let layer = match &entry.layer {
            Some(layer) => {
                image.push_layer(layer.diff_id.clone(), entry.history.clone());
                let mut descriptor = layer.descriptor.clone();
                descriptor.media_type = descriptor
                    .media_type
                    .in_format(ImageFormat::Oci)
                    .unwrap_or(descriptor.media_type);
                Some(CachedLayer {
                    descriptor,
                    diff_id: layer.diff_id.clone(),
                })
            }
            None => {
                image.push_empty_layer_history(entry.history.clone());
                None
            }
        };
        let history = image.history[0].clone();
        let config = image
            .to_blob(ImageFormat::Oci)
            .map_err(|source| CacheError::Image {
                what: format!("cache entry {} config", entry.key),
                source,
            })?;
        // The config travels inside the manifest too, so a lookup is one request. A config
        // too big to inline (long ENV or LABEL lists) is only stored as a blob.
        let config_descriptor = if config.bytes.len() <= MAX_INLINE_CONFIG {
            config.descriptor_with_data()
        } else {
            config.descriptor()
        };
        let manifest = ManifestBuilder::new(ImageFormat::Oci)
            .config_descriptor(config_descriptor)
            .layers(layer.iter().map(|l| l.descriptor.clone()))
            .annotation(ANNOTATION_KEY, &entry.key.to_string())
            .annotation(ANNOTATION_CREATED_UNIX, &seconds.to_string())
            .annotation(ANNOTATION_CREATED, &created_text)
            .build()
            .and_then(|m| m.to_blob())
            .map_err(|source| CacheError::Image {
                what: format!("cache entry {} manifest", entry.key),
                source,
            })?;
        Ok(EntryDocuments {
            config,
            manifest,
            layer,
            history,
        })
    }
}

pub(crate) fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The manifest's creation time, or an error naming `location` if the annotation is missing.
fn entry_created(manifest: &Manifest, location: &str) -> Result<SystemTime, CacheError> {
    let seconds: u64 = manifest
        .annotations
        .get(ANNOTATION_CREATED_UNIX)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            CacheError::invalid(
                location,
                format!("no valid {ANNOTATION_CREATED_UNIX} annotation"),
            )
        })?;
    Ok(UNIX_EPOCH + Duration::from_secs(seconds))
}

/// Parses an entry's manifest; `None` when the entry is older than `ttl` at `now` (a miss).
pub(crate) fn fresh_manifest(
    bytes: &[u8],
    location: &str,
    ttl: Duration,
    now: SystemTime,
) -> Result<Option<(Manifest, SystemTime)>, CacheError> {
    let manifest = Manifest::from_json(bytes).map_err(|source| CacheError::Image {
        what: location.to_owned(),
        source,
    })?;
    let created = entry_created(&manifest, location)?;
    Ok((!expired(created, ttl, now)).then_some((manifest, created)))
}

pub(crate) fn expired(created: SystemTime, ttl: Duration, now: SystemTime) -> bool {
    // Creation times are stored in whole seconds, so the age is measured in whole seconds too:
    // comparing a truncated creation time with a precise "now" would age an entry by up to a
    // second at birth. A clock that went backwards makes the age zero: the entry counts as fresh.
    let age_seconds = unix_seconds(now).saturating_sub(unix_seconds(created));
    age_seconds > ttl.as_secs()
}

/// Checks the manifest belongs to `key` and turns it and its config into an entry.
fn parse_entry(
    key: &CacheKey,
    location: &str,
    manifest_digest: Digest,
    manifest: &Manifest,
    created: SystemTime,
    config_bytes: &[u8],
) -> Result<CacheEntry, CacheError> {
    if manifest.annotations.get(ANNOTATION_KEY).map(String::as_str) != Some(&key.to_string()) {
        return Err(CacheError::invalid(
            location,
            format!("the manifest is not a cache entry for {key}"),
        ));
    }
    let mut image = ImageConfig::from_json(config_bytes).map_err(|source| CacheError::Image {
        what: format!("{location} config"),
        source,
    })?;
    if image.history.len() != 1 || manifest.layers.len() != image.rootfs.diff_ids.len() {
        return Err(CacheError::invalid(
            location,
            "a cache entry holds one history entry and at most one layer",
        ));
    }
    let layer = match (manifest.layers.first(), image.rootfs.diff_ids.first()) {
        (Some(descriptor), Some(diff_id)) if manifest.layers.len() == 1 => Some(CachedLayer {
            descriptor: descriptor.clone(),
            diff_id: diff_id.clone(),
        }),
        (None, None) => None,
        _ => {
            return Err(CacheError::invalid(
                location,
                "a cache entry holds at most one layer",
            ))
        }
    };
    Ok(CacheEntry {
        key: key.clone(),
        layer,
        config: std::mem::take(&mut image.config),
        history: image.history.remove(0),
        created,
        manifest_digest,
    })
}

async fn registry_lookup(
    client: &Client,
    repo: &Repository,
    key: &CacheKey,
    ttl: Duration,
    clock: &dyn Clock,
) -> Result<Option<CacheEntry>, CacheError> {
    let tag = key.tag();
    let location = format!("{repo}:{tag}");
    let fetched = match client.get_manifest(repo, &tag).await {
        Ok(fetched) => fetched,
        Err(err) if err.status().is_some_and(|s| s.as_u16() == 404) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let Some((manifest, created)) = fresh_manifest(&fetched.bytes, &location, ttl, clock.now())?
    else {
        return Ok(None);
    };
    let fetched_config = match manifest.config.embedded_data() {
        Some(config) => Ok(config),
        None => read_small_blob(client, repo, &manifest.config.digest, MAX_CONFIG_SIZE).await,
    };
    let config = match fetched_config {
        Ok(config) => config,
        // A manifest whose config is gone (partial garbage collection) is a miss.
        Err(CacheError::Registry(err)) if err.status().is_some_and(|s| s.as_u16() == 404) => {
            return Ok(None)
        }
        Err(err) => return Err(err),
    };
    parse_entry(key, &location, fetched.digest, &manifest, created, &config).map(Some)
}

fn layout_lookup(
    layout: &OciLayout,
    key: &CacheKey,
    ttl: Duration,
    clock: &dyn Clock,
) -> Result<Option<CacheEntry>, CacheError> {
    let tag = key.tag();
    let location = format!("oci:{}:{tag}", layout.path().display());
    let Some(descriptor) = layout_tagged(layout, &tag)? else {
        return Ok(None);
    };
    let bytes = layout.read_blob_bytes(&descriptor.digest, MAX_MANIFEST_SIZE)?;
    let Some((manifest, created)) = fresh_manifest(&bytes, &location, ttl, clock.now())? else {
        return Ok(None);
    };
    if let Some(layer) = manifest.layers.first() {
        if !layout.has_blob(&layer.digest) {
            return Ok(None);
        }
    }
    let config = layout.read_blob_bytes(&manifest.config.digest, MAX_CONFIG_SIZE)?;
    parse_entry(
        key,
        &location,
        descriptor.digest.clone(),
        &manifest,
        created,
        &config,
    )
    .map(Some)
}

/// The manifest descriptor tagged `tag` in the layout's `index.json`.
pub(crate) fn layout_tagged(
    layout: &OciLayout,
    tag: &str,
) -> Result<Option<Descriptor>, CacheError> {
    Ok(layout
        .index()?
        .manifests
        .into_iter()
        .find(|d| d.annotation(kiln_oci::image::ANNOTATION_REF_NAME) == Some(tag)))
}

/// Tags `descriptor` in the layout's `index.json` while holding an exclusive lock on
/// `index.json.lock`, so two builds writing to one cache layout never lose each other's tags
/// (the read-modify-write of `index.json` is the only step that needs serialising: blobs are
/// content-addressed and written through temporary files).
pub(crate) fn tag_locked(
    layout: &OciLayout,
    tag: &str,
    descriptor: Descriptor,
) -> Result<(), CacheError> {
    let _lock = lock_index(layout.path())?;
    layout.tag(tag, descriptor)?;
    Ok(())
}

/// Takes the exclusive lock on a layout's `index.json.lock`; it is released when the returned
/// file is closed.
pub(crate) fn lock_index(dir: &Path) -> Result<File, CacheError> {
    let lock_path = dir.join("index.json.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(CacheError::io(&lock_path))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| CacheError::io(&lock_path)(e.into()))?;
    Ok(lock)
}

/// Downloads a small blob (a config) whole, verified, refusing more than `limit` bytes.
pub(crate) async fn read_small_blob(
    client: &Client,
    repo: &Repository,
    digest: &Digest,
    limit: u64,
) -> Result<Vec<u8>, CacheError> {
    use futures::StreamExt as _;
    let mut stream = client.get_blob(repo, digest).await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk?);
        if bytes.len() as u64 > limit {
            return Err(CacheError::invalid(
                format!("{repo}@{digest}"),
                format!("blob larger than {limit} bytes"),
            ));
        }
    }
    Ok(bytes)
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| CacheError::Task(what.to_owned()))?
}

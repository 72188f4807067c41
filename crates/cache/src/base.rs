//! `--cache-dir`: base images kept on local disk by digest, filled by `executor warm` and read
//! by the engine's base pull instead of the registry.
//!
//! The directory is a [`kiln_fs::blobstore::BlobStore`] (`DIR/blobs/sha256/HEX`, the blob
//! layout of an OCI image layout): manifests, indexes, configs and layers are all blobs, named
//! by digest. A blob appears under its name only after its content was verified and renamed
//! into place, and the warmer writes an image's layers and config before its manifest and
//! the manifest before the index that names it, so a manifest that is present means a complete
//! image. Two warmers sharing a directory at worst download the same blob twice; each rename
//! installs identical bytes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use kiln_fs::blobstore::BlobStore;
use kiln_oci::layout::{MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE};
use kiln_oci::{AnyManifest, Descriptor, Digest, ImageConfig, Manifest, Platform, Reference};
use kiln_registry::{Client, Repository};

use crate::clock::{Clock, SystemClock};
use crate::error::CacheError;
use crate::store::blocking;

/// How deep nested indexes are followed.
const MAX_INDEX_DEPTH: usize = 4;
/// Chunks in flight between a download and the thread writing it to disk.
const WRITE_QUEUE: usize = 16;

/// A base image found in the directory, ready for unpacking from local files.
#[derive(Clone, Debug)]
pub struct BaseImage {
    /// The digest of the platform-specific manifest (the cache key chain's [`crate::Parent`]).
    pub manifest_digest: Digest,
    /// The manifest.
    pub manifest: Manifest,
    /// The image config.
    pub config: ImageConfig,
    /// Each layer's descriptor with the file holding its compressed blob, in manifest order.
    pub layers: Vec<(Descriptor, PathBuf)>,
}

/// What a [`BaseImageDir::warm`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmReport {
    /// The digest the reference resolved to (an index or a manifest).
    pub digest: Digest,
    /// The platform-specific manifest's digest.
    pub manifest_digest: Digest,
    /// How many blobs (manifests, config, layers) were downloaded; 0 when the image was
    /// already complete in the directory.
    pub blobs_fetched: usize,
    /// How many bytes were downloaded.
    pub bytes_fetched: u64,
}

/// The `--cache-dir` base image store.
#[derive(Clone, Debug)]
pub struct BaseImageDir {
    store: BlobStore,
    /// What stored images are aged against when pruned.
    clock: Arc<dyn Clock>,
}

impl BaseImageDir {
    /// Opens (creating if needed) the directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<BaseImageDir, CacheError> {
        Ok(BaseImageDir {
            store: BlobStore::open(dir)?,
            clock: Arc::new(SystemClock),
        })
    }

    /// The same directory, aging stored images against `clock` when pruning (the system
    /// clock otherwise).
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> BaseImageDir {
        BaseImageDir { clock, ..self }
    }

    pub(crate) fn now(&self) -> std::time::SystemTime {
        self.clock.now()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.store.root()
    }

    /// The image with manifest or index digest `digest`, following an index to the manifest
    /// for `platform`; `None` if it (or any of its blobs) is not in the directory. Blocking
    /// (reads small files); async callers use `spawn_blocking`.
    pub fn lookup(
        &self,
        digest: &Digest,
        platform: &Platform,
    ) -> Result<Option<BaseImage>, CacheError> {
        let mut digest = digest.clone();
        for _ in 0..=MAX_INDEX_DEPTH {
            let Some(bytes) = self.read_blob(&digest, MAX_MANIFEST_SIZE)? else {
                return Ok(None);
            };
            let location = self.store.blob_path(&digest);
            match AnyManifest::parse(None, &bytes).map_err(|source| CacheError::Image {
                what: location.display().to_string(),
                source,
            })? {
                AnyManifest::Index(index) => match index.select(platform) {
                    Some(child) => digest = child.digest.clone(),
                    None => return Ok(None),
                },
                AnyManifest::Manifest(manifest) => {
                    let Some(config_bytes) =
                        self.read_blob(&manifest.config.digest, MAX_CONFIG_SIZE)?
                    else {
                        return Ok(None);
                    };
                    let config = ImageConfig::from_json(&config_bytes).map_err(|source| {
                        CacheError::Image {
                            what: self
                                .store
                                .blob_path(&manifest.config.digest)
                                .display()
                                .to_string(),
                            source,
                        }
                    })?;
                    let mut layers = Vec::with_capacity(manifest.layers.len());
                    for layer in &manifest.layers {
                        if !self.store.contains(&layer.digest) {
                            return Ok(None);
                        }
                        layers.push((layer.clone(), self.store.blob_path(&layer.digest)));
                    }
                    return Ok(Some(BaseImage {
                        manifest_digest: digest,
                        manifest,
                        config,
                        layers,
                    }));
                }
            }
        }
        Err(CacheError::invalid(
            self.store.blob_path(&digest).display(),
            format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
        ))
    }

    /// Reads a small blob whole and verifies it; `None` if absent.
    pub(crate) fn read_blob(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.store.blob_path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io(&path)(e)),
        };
        if bytes.len() as u64 > limit {
            return Err(CacheError::invalid(
                path.display(),
                format!("larger than {limit} bytes"),
            ));
        }
        let mut hasher = digest.hasher();
        hasher.update(&bytes);
        if &hasher.finish() != digest {
            return Err(CacheError::invalid(
                path.display(),
                "content does not match its digest",
            ));
        }
        Ok(Some(bytes))
    }

    /// Pulls `reference` (for `platform`) into the directory: its index (if any), manifest,
    /// config and layers, downloading only blobs that are missing. A reference by digest whose
    /// image is complete here needs no network at all; one by tag costs one manifest `HEAD`.
    pub async fn warm(
        &self,
        client: &Client,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<WarmReport, CacheError> {
        let repo = Repository::from(reference);
        let known = match reference.digest() {
            Some(digest) => Some(digest.clone()),
            None => client
                .head_manifest_ref(reference)
                .await?
                .and_then(|info| info.digest),
        };
        if let Some(digest) = &known {
            if let Some(image) = self.lookup_blocking(digest, platform).await? {
                return Ok(WarmReport {
                    digest: digest.clone(),
                    manifest_digest: image.manifest_digest,
                    blobs_fetched: 0,
                    bytes_fetched: 0,
                });
            }
        }

        // Manifests to write once everything they name is present, innermost first.
        let mut documents: Vec<(Digest, Bytes)> = Vec::new();
        let mut fetched = client
            .get_manifest(&repo, &reference.manifest_reference())
            .await?;
        let resolved = fetched.digest.clone();
        let manifest = loop {
            let location = format!("{repo}@{}", fetched.digest);
            let parsed = AnyManifest::parse(Some(fetched.media_type.as_str()), &fetched.bytes)
                .map_err(|source| CacheError::Image {
                    what: location.clone(),
                    source,
                })?;
            documents.push((fetched.digest.clone(), fetched.bytes.clone()));
            match parsed {
                AnyManifest::Manifest(manifest) => break manifest,
                AnyManifest::Index(index) => {
                    if documents.len() > MAX_INDEX_DEPTH {
                        return Err(CacheError::invalid(
                            location,
                            format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
                        ));
                    }
                    let child = index.select(platform).ok_or_else(|| {
                        CacheError::invalid(
                            &location,
                            format!("no manifest for platform {platform}"),
                        )
                    })?;
                    fetched = client
                        .get_manifest(&repo, &child.digest.to_string())
                        .await?;
                }
            }
        };
        let mut report = WarmReport {
            digest: resolved,
            manifest_digest: documents
                .last()
                .map(|(digest, _)| digest.clone())
                .expect("the loop pushed the manifest"),
            blobs_fetched: 0,
            bytes_fetched: 0,
        };

        let blobs = std::iter::once(&manifest.config).chain(&manifest.layers);
        let downloads = blobs
            .filter(|d| !self.store.contains(&d.digest))
            .map(|d| self.download(client, &repo, &d.digest));
        for size in futures::future::try_join_all(downloads).await? {
            report.blobs_fetched += 1;
            report.bytes_fetched += size;
        }
        for (digest, bytes) in documents.into_iter().rev() {
            if self.store.contains(&digest) {
                continue;
            }
            report.blobs_fetched += 1;
            report.bytes_fetched += bytes.len() as u64;
            let store = self.store.clone();
            blocking("writing a manifest to the cache dir", move || {
                let mut file = store.create()?;
                file.write_all(&bytes)
                    .map_err(CacheError::io(store.blob_path(&digest)))?;
                file.commit(&digest)?;
                Ok(())
            })
            .await?;
        }
        Ok(report)
    }

    async fn lookup_blocking(
        &self,
        digest: &Digest,
        platform: &Platform,
    ) -> Result<Option<BaseImage>, CacheError> {
        let dir = self.clone();
        let digest = digest.clone();
        let platform = platform.clone();
        blocking("cache dir lookup", move || dir.lookup(&digest, &platform)).await
    }

    /// Streams one blob from the registry into the store: the download verifies the digest,
    /// a blocking thread writes, and the file is renamed into place only when both succeeded.
    async fn download(
        &self,
        client: &Client,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<u64, CacheError> {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let store = self.store.clone();
        let path = store.blob_path(digest);
        let writer_path = path.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut file = store.create()?;
            while let Some(chunk) = receiver.blocking_recv() {
                file.write_all(&chunk)
                    .map_err(CacheError::io(&writer_path))?;
            }
            Ok::<_, CacheError>(file)
        });
        let transfer = async {
            let mut stream = client.get_blob(repo, digest).await?;
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                if sender.send(chunk).await.is_err() {
                    // The writer stopped on an error, which its join result reports.
                    break;
                }
            }
            Ok::<_, CacheError>(size)
        }
        .await;
        drop(sender);
        let file = writer
            .await
            .map_err(|_| CacheError::Task(format!("writing {}", path.display())))?;
        // Dropping an uncommitted file removes the partial download.
        let size = transfer?;
        let file = file?;
        let digest = digest.clone();
        blocking("committing a blob to the cache dir", move || {
            file.commit(&digest)?;
            Ok(())
        })
        .await?;
        Ok(size)
    }
}

//! Retention: removing what has grown old from a step cache (a registry repository or an OCI
//! layout, [`CacheStore::prune`]) and from a `--cache-dir` ([`BaseImageDir::prune`]), for
//! `executor cache prune`. Lookups already treat entries older than the TTL as misses; this is
//! what takes them out of storage.
//!
//! # What counts as old
//!
//! - Step entries and stage records carry their creation time ([`ANNOTATION_CREATED_UNIX`]).
//!   One is old when its age in whole seconds is greater than the cutoff, the very rule
//!   lookups apply to the TTL, so pruning with the TTL as cutoff removes exactly what lookups
//!   already ignore.
//! - A tag whose manifest lacks those annotations (a buildpacks cache image, anything someone
//!   else pushed into the repository) is not Kiln's entry: it is left alone and counted as
//!   "other".
//! - A base image in a `--cache-dir` records no time of its own. Its age is the modification
//!   time of its top-level document (the manifest, or the index for an image reached through
//!   one), which the warmer writes last, after every blob the image needs: the time the image
//!   became complete in the directory. Warming an image that is already complete downloads
//!   nothing and does not make it younger. (kaniko ages the images of its cache directory by
//!   their files' modification time too.)
//!
//! # How each kind is pruned
//!
//! - Registry: the tag list, a `GET` of every tagged manifest, then `DELETE
//!   /v2/<name>/manifests/<digest>` for each old one. The API deletes a manifest with every tag
//!   that points to it, so a digest that a kept tag also names is kept. Blobs cannot be
//!   deleted safely through the API (it cannot tell whether another manifest uses them); the
//!   registry's garbage collection frees them once no manifest refers to them, so the bytes
//!   freed are not known here. A registry that answers a `DELETE` with 401, 403 or 405
//!   (distribution refuses deletes unless its configuration enables them) has *refused*: the
//!   refusal is recorded in the report and pruning goes on.
//! - OCI layout: under the lock builds take to tag entries, old entries leave `index.json`
//!   (replaced atomically), then blobs no remaining manifest refers to are removed: those the
//!   removed entries referred to, and blobs nothing refers to (left by an interrupted write)
//!   whose files are older than the cutoff, so the blobs of a write still in progress stay.
//!   `index.json` is written first, so a prune cut short never leaves it naming a missing
//!   blob. If a remaining manifest cannot be read, what it refers to is unknown and no blob is
//!   removed.
//! - `--cache-dir`: the same, per stored image: an old image's documents and blobs are removed
//!   unless a younger image still uses them (base images share layers).
//!
//! A build that stores into a layout or cache directory while it is pruned can, at worst,
//! reuse a blob that is being removed; its entry then misses later (a lookup checks that the
//! layer is there). Nothing is ever served from a half-removed entry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use kiln_fs::resolve::Root;
use kiln_oci::image::ANNOTATION_REF_NAME;
use kiln_oci::layout::{LayoutError, OciLayout, MAX_MANIFEST_SIZE};
use kiln_oci::{AnyManifest, Descriptor, Digest, Manifest, MediaType};
use kiln_registry::{Client, Repository};

use crate::base::BaseImageDir;
use crate::error::CacheError;
use crate::stage::STAGE_RECORD_MEDIA_TYPE;
use crate::store::{
    blocking, expired, lock_index, unix_seconds, Backend, CacheStore, ANNOTATION_CREATED_UNIX,
    ANNOTATION_KEY,
};

/// How many manifest requests a registry prune keeps in flight: enough to hide latency, few
/// enough not to look like an attack to a registry's rate limit.
const CONCURRENT_REQUESTS: usize = 8;
/// How deep nested indexes are followed when finding what a document refers to.
const MAX_INDEX_DEPTH: usize = 4;

/// What to prune.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneOptions {
    /// Entries, records and stored images older than this are removed (`--older-than`; the
    /// executor's default is the cache TTL).
    pub older_than: Duration,
    /// Report what would be removed, change nothing (`--dry-run`).
    pub dry_run: bool,
}

/// What a removed (or, in a dry run, removable) item was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PrunedKind {
    /// A step's cache entry, tagged by its key.
    StepEntry,
    /// A stage record, tagged `stage-<locator>`.
    StageRecord,
    /// A base image stored in a `--cache-dir`.
    BaseImage,
}

impl fmt::Display for PrunedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PrunedKind::StepEntry => "step entry",
            PrunedKind::StageRecord => "stage record",
            PrunedKind::BaseImage => "base image",
        })
    }
}

/// One item pruned, or to be pruned in a dry run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrunedItem {
    /// What it was.
    pub kind: PrunedKind,
    /// Its tag (step entries, stage records), or its digest (base images, which have none).
    pub name: String,
    /// The digest of its manifest (or index).
    pub digest: Digest,
    /// How old it was, in whole seconds.
    pub age: Duration,
}

/// A `DELETE` the registry refused (401, 403 or 405): the item is still there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedDelete {
    /// The item that stays.
    pub item: PrunedItem,
    /// The registry that refused.
    pub registry: String,
    /// The request, as `DELETE /v2/<name>/manifests/<digest>`.
    pub request: String,
    /// The HTTP status.
    pub status: u16,
    /// The registry's answer: the status line, with the error code and message it sent
    /// (`405 Method Not Allowed (UNSUPPORTED: The operation is unsupported.)`).
    pub message: String,
}

/// Something that could not be examined or removed; the prune went on without it.
#[derive(Debug)]
pub struct PruneFailure {
    /// What it concerned (a tag, a blob, the blobs of a layout).
    pub what: String,
    /// Why.
    pub error: CacheError,
}

/// What a prune did, or in a dry run would do.
#[derive(Debug)]
pub struct PruneReport {
    /// The cache pruned: `registry/repo`, `oci:PATH` or the cache directory.
    pub location: String,
    /// Whether this was a dry run (nothing was changed; `removed` is what would be).
    pub dry_run: bool,
    /// What was removed, ordered by name.
    pub removed: Vec<PrunedItem>,
    /// Deletes the registry refused, ordered by name.
    pub refused: Vec<RefusedDelete>,
    /// What could not be examined or removed.
    pub failed: Vec<PruneFailure>,
    /// Entries, records or images young enough to stay (with those an old tag shares its
    /// manifest with).
    pub kept: usize,
    /// Tags that are not Kiln cache entries, left alone.
    pub other: usize,
    /// Blob files removed (a layout or cache directory).
    pub blobs_removed: usize,
    /// Bytes of those files; `None` for a registry, where garbage collection frees them.
    pub bytes_freed: Option<u64>,
}

impl PruneReport {
    fn new(location: String, dry_run: bool, bytes_known: bool) -> PruneReport {
        PruneReport {
            location,
            dry_run,
            removed: Vec::new(),
            refused: Vec::new(),
            failed: Vec::new(),
            kept: 0,
            other: 0,
            blobs_removed: 0,
            bytes_freed: bytes_known.then_some(0),
        }
    }

    fn sort(&mut self) {
        self.removed
            .sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        self.refused
            .sort_by(|a, b| (a.item.kind, &a.item.name).cmp(&(b.item.kind, &b.item.name)));
    }
}

impl CacheStore {
    /// Removes the entries and stage records older than `options.older_than` (by this store's
    /// clock), as the module docs describe. `Err` only when the cache could not be listed at
    /// all; whatever else goes wrong is in the report's `failed`, refusals in `refused`.
    pub async fn prune(&self, options: &PruneOptions) -> Result<PruneReport, CacheError> {
        let now = self.clock.now();
        match &self.backend {
            Backend::Registry { client, repo } => prune_registry(client, repo, options, now).await,
            Backend::Layout(layout) => {
                let layout = layout.clone();
                let options = options.clone();
                blocking("cache prune", move || prune_layout(&layout, &options, now)).await
            }
        }
    }
}

impl BaseImageDir {
    /// Removes the stored images older than `options.older_than` (aged by the modification
    /// time of their top-level document, see the module docs) and the blobs no younger image
    /// uses.
    pub async fn prune(&self, options: &PruneOptions) -> Result<PruneReport, CacheError> {
        let dir = self.clone();
        let options = options.clone();
        let now = self.now();
        blocking("cache dir prune", move || {
            prune_base_dir(&dir, &options, now)
        })
        .await
    }
}

/// A tagged manifest's kind and creation time, if it is one of Kiln's entries or records.
fn classify(manifest: &Manifest) -> Option<(PrunedKind, SystemTime)> {
    manifest.annotations.get(ANNOTATION_KEY)?;
    let seconds: u64 = manifest
        .annotations
        .get(ANNOTATION_CREATED_UNIX)?
        .parse()
        .ok()?;
    let kind = if manifest.config.media_type == MediaType::Other(STAGE_RECORD_MEDIA_TYPE.into()) {
        PrunedKind::StageRecord
    } else {
        PrunedKind::StepEntry
    };
    Some((kind, UNIX_EPOCH + Duration::from_secs(seconds)))
}

/// The age in whole seconds, as [`expired`] measures it.
fn age(created: SystemTime, now: SystemTime) -> Duration {
    Duration::from_secs(unix_seconds(now).saturating_sub(unix_seconds(created)))
}

/// Whether the registry said no for good, rather than failed: retrying will not change it.
fn is_refusal(error: &kiln_registry::Error) -> bool {
    match error {
        kiln_registry::Error::Status { status, body, .. } => {
            matches!(status.as_u16(), 401 | 403 | 405)
                || body
                    .as_ref()
                    .is_some_and(|b| matches!(b.code.as_str(), "UNSUPPORTED" | "DENIED"))
        }
        _ => false,
    }
}

/// A refusal as the registry put it: status line, then its error code and message if any.
fn refusal_message(error: &kiln_registry::Error) -> String {
    match error {
        kiln_registry::Error::Status {
            status,
            body: Some(body),
            ..
        } if !body.message.is_empty() => format!("{status} ({}: {})", body.code, body.message),
        kiln_registry::Error::Status {
            status,
            body: Some(body),
            ..
        } => format!("{status} ({})", body.code),
        kiln_registry::Error::Status { status, .. } => status.to_string(),
        other => other.to_string(),
    }
}

async fn prune_registry(
    client: &Client,
    repo: &Repository,
    options: &PruneOptions,
    now: SystemTime,
) -> Result<PruneReport, CacheError> {
    let mut report = PruneReport::new(repo.to_string(), options.dry_run, false);
    let tags = match client.list_tags(repo).await {
        Ok(tags) => tags,
        // Distribution answers 404 for a repository nothing was pushed to yet: nothing to prune.
        Err(err) if err.status().is_some_and(|s| s.as_u16() == 404) => Vec::new(),
        Err(err) => return Err(err.into()),
    };
    let mut fetched: Vec<_> = futures::stream::iter(tags)
        .map(|tag| async move {
            let result = client.get_manifest(repo, &tag).await;
            (tag, result)
        })
        .buffer_unordered(CONCURRENT_REQUESTS)
        .collect()
        .await;
    fetched.sort_by(|a, b| a.0.cmp(&b.0));

    let mut old: BTreeMap<Digest, Vec<PrunedItem>> = BTreeMap::new();
    let mut kept_digests = BTreeSet::new();
    for (tag, result) in fetched {
        let manifest = match result {
            Ok(manifest) => manifest,
            // Deleted or moved since the listing: nothing left to decide about.
            Err(err) if err.status().is_some_and(|s| s.as_u16() == 404) => continue,
            Err(err) => {
                report.failed.push(PruneFailure {
                    what: format!("{repo}:{tag}"),
                    error: err.into(),
                });
                continue;
            }
        };
        let class = Manifest::from_json(&manifest.bytes)
            .ok()
            .as_ref()
            .and_then(classify);
        match class {
            Some((kind, created)) if expired(created, options.older_than, now) => {
                old.entry(manifest.digest.clone())
                    .or_default()
                    .push(PrunedItem {
                        kind,
                        name: tag,
                        digest: manifest.digest,
                        age: age(created, now),
                    });
            }
            Some(_) => {
                report.kept += 1;
                kept_digests.insert(manifest.digest);
            }
            None => {
                report.other += 1;
                kept_digests.insert(manifest.digest);
            }
        }
    }
    // A DELETE takes every tag of the manifest with it, so one shared with a kept tag stays.
    let mut doomed = Vec::new();
    for (digest, items) in old {
        if kept_digests.contains(&digest) {
            report.kept += items.len();
        } else {
            doomed.push((digest, items));
        }
    }

    let dry_run = options.dry_run;
    let outcomes: Vec<_> = futures::stream::iter(doomed)
        .map(|(digest, items)| async move {
            let result = if dry_run {
                Ok(true)
            } else {
                client.delete_manifest(repo, &digest).await
            };
            (digest, items, result)
        })
        .buffer_unordered(CONCURRENT_REQUESTS)
        .collect()
        .await;
    for (digest, items, result) in outcomes {
        match result {
            // `false`: already gone (another prune got there first), which is what was wanted.
            Ok(_) => report.removed.extend(items),
            Err(err) if is_refusal(&err) => {
                let status = err.status().map_or(0, |s| s.as_u16());
                let message = refusal_message(&err);
                for item in items {
                    report.refused.push(RefusedDelete {
                        item,
                        registry: repo.registry().to_owned(),
                        request: format!("DELETE /v2/{}/manifests/{digest}", repo.name()),
                        status,
                        message: message.clone(),
                    });
                }
            }
            Err(err) => {
                let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
                report.failed.push(PruneFailure {
                    what: format!("{repo}:{} ({digest})", names.join(",")),
                    error: err.into(),
                });
            }
        }
    }
    report.sort();
    Ok(report)
}

/// Reads a document for [`references`]: `Ok(None)` when it is not there.
type ReadDocument<'a> = dyn Fn(&Digest) -> Result<Option<Vec<u8>>, CacheError> + 'a;

/// Adds `digest` and every blob the document under it refers to (config, layers, an index's
/// manifests, recursively) to `into`. Returns `false` when a document that is present could
/// not be read or parsed: what it refers to is then unknown. A missing document refers to
/// nothing that is here (an index's manifests for platforms never fetched are missing).
fn references(
    read: &ReadDocument<'_>,
    digest: &Digest,
    media_type: Option<&MediaType>,
    into: &mut BTreeSet<Digest>,
    depth: usize,
) -> bool {
    into.insert(digest.clone());
    if media_type.is_some_and(|t| !t.is_manifest() && !t.is_index()) {
        return true;
    }
    let bytes = match read(digest) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return true,
        Err(_) => return false,
    };
    match AnyManifest::parse(media_type.map(MediaType::as_str), &bytes) {
        Ok(AnyManifest::Manifest(manifest)) => {
            into.insert(manifest.config.digest.clone());
            into.extend(manifest.layers.iter().map(|l| l.digest.clone()));
            true
        }
        Ok(AnyManifest::Index(index)) if depth < MAX_INDEX_DEPTH => {
            index.manifests.iter().all(|child| {
                references(
                    read,
                    &child.digest,
                    Some(&child.media_type),
                    into,
                    depth + 1,
                )
            })
        }
        _ => false,
    }
}

/// A blob file in a layout or cache directory.
struct BlobFile {
    digest: Digest,
    /// Relative to the layout or directory.
    rel: PathBuf,
    size: u64,
    modified: SystemTime,
}

/// The blob files of the layout or cache directory at `root`, read through a [`Root`] so a
/// symlink planted in it leads nowhere outside.
struct Blobs {
    tree: Root,
    files: Vec<BlobFile>,
}

impl Blobs {
    /// Every file under `root/blobs/<algorithm>/` named by a valid digest (temporary files of
    /// writes in progress are not).
    fn list(root: &Path) -> Result<Blobs, CacheError> {
        let tree = Root::open(root).map_err(|e| root_error(root, Path::new(""), e))?;
        let blobs = Path::new("blobs");
        let algorithms = match tree.read_dir(blobs) {
            Ok(names) => names,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(root_error(root, blobs, e)),
        };
        let mut files = Vec::new();
        for algorithm in algorithms {
            let dir = blobs.join(&algorithm);
            if !tree.symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let algorithm_name = algorithm.to_string_lossy().into_owned();
            let names = tree.read_dir(&dir).map_err(|e| root_error(root, &dir, e))?;
            for name in names {
                let Ok(digest) =
                    Digest::parse(&format!("{algorithm_name}:{}", name.to_string_lossy()))
                else {
                    continue;
                };
                let rel = dir.join(&name);
                let metadata = tree
                    .symlink_metadata(&rel)
                    .map_err(|e| root_error(root, &rel, e))?;
                if !metadata.is_file() {
                    continue;
                }
                files.push(BlobFile {
                    digest,
                    size: metadata.len(),
                    modified: metadata.modified().map_err(|e| CacheError::Io {
                        path: tree.path().join(&rel),
                        source: e,
                    })?,
                    rel,
                });
            }
        }
        files.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(Blobs { tree, files })
    }

    /// Whether the blob's first byte opens a JSON object, so layers (gzip, zstd, tar) are never
    /// read whole while looking for documents.
    fn starts_like_json(&self, file: &BlobFile) -> bool {
        let mut first = [0u8; 1];
        self.tree
            .open_file(&file.rel)
            .is_ok_and(|mut f| f.read_exact(&mut first).is_ok() && first[0] == b'{')
    }
}

/// A failure of a contained file operation, as the cache reports I/O errors.
fn root_error(root: &Path, rel: &Path, e: kiln_fs::resolve::RootError) -> CacheError {
    CacheError::Io {
        path: root.join(rel),
        source: std::io::Error::other(e),
    }
}

/// Removes (or in a dry run counts) the blob files in `dropped`, and those in neither `keep`
/// nor `dropped` that are older than the cutoff, never one in `keep`.
fn remove_blobs(
    blobs: Blobs,
    keep: &BTreeSet<Digest>,
    dropped: &BTreeSet<Digest>,
    options: &PruneOptions,
    now: SystemTime,
    report: &mut PruneReport,
) {
    let Blobs { tree, files } = blobs;
    for file in files {
        if keep.contains(&file.digest) {
            continue;
        }
        let orphan_and_old =
            !dropped.contains(&file.digest) && expired(file.modified, options.older_than, now);
        if !dropped.contains(&file.digest) && !orphan_and_old {
            continue;
        }
        if !options.dry_run {
            match tree.remove(&file.rel) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    report.failed.push(PruneFailure {
                        what: format!("blob {}", file.digest),
                        error: root_error(tree.path(), &file.rel, e),
                    });
                    continue;
                }
            }
        }
        report.blobs_removed += 1;
        if let Some(bytes) = &mut report.bytes_freed {
            *bytes += file.size;
        }
    }
}

fn unknown_references(location: &str) -> PruneFailure {
    PruneFailure {
        what: "unreferenced blobs".to_owned(),
        error: CacheError::invalid(
            location,
            "left in place: a document that stays could not be read, so what it refers to is unknown",
        ),
    }
}

fn prune_layout(
    layout: &OciLayout,
    options: &PruneOptions,
    now: SystemTime,
) -> Result<PruneReport, CacheError> {
    let location = format!("oci:{}", layout.path().display());
    let mut report = PruneReport::new(location.clone(), options.dry_run, true);
    // Held to the end: no build tags an entry while the index is rewritten and blobs go.
    let _lock = lock_index(layout.path())?;
    let mut index = layout.index()?;
    let read = |digest: &Digest| match layout.read_blob_bytes(digest, MAX_MANIFEST_SIZE) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(LayoutError::BlobNotFound { .. }) => Ok(None),
        Err(e) => Err(CacheError::from(e)),
    };

    let mut remaining = Vec::new();
    let mut removed: Vec<Descriptor> = Vec::new();
    for descriptor in std::mem::take(&mut index.manifests) {
        let name = descriptor
            .annotation(ANNOTATION_REF_NAME)
            .map_or_else(|| descriptor.digest.to_string(), str::to_owned);
        let manifest = match read(&descriptor.digest) {
            Ok(Some(bytes)) => Manifest::from_json(&bytes).ok(),
            Ok(None) => {
                report.failed.push(PruneFailure {
                    what: format!("{location}:{name}"),
                    error: LayoutError::BlobNotFound {
                        path: layout.blob_path(&descriptor.digest),
                        digest: descriptor.digest.clone(),
                    }
                    .into(),
                });
                remaining.push(descriptor);
                continue;
            }
            Err(error) => {
                report.failed.push(PruneFailure {
                    what: format!("{location}:{name}"),
                    error,
                });
                remaining.push(descriptor);
                continue;
            }
        };
        match manifest.as_ref().and_then(classify) {
            Some((kind, created)) if expired(created, options.older_than, now) => {
                report.removed.push(PrunedItem {
                    kind,
                    name,
                    digest: descriptor.digest.clone(),
                    age: age(created, now),
                });
                removed.push(descriptor);
            }
            Some(_) => {
                report.kept += 1;
                remaining.push(descriptor);
            }
            None => {
                report.other += 1;
                remaining.push(descriptor);
            }
        }
    }

    let mut keep = BTreeSet::new();
    let mut known = true;
    for descriptor in &remaining {
        known &= references(
            &read,
            &descriptor.digest,
            Some(&descriptor.media_type),
            &mut keep,
            0,
        );
    }
    let mut dropped = BTreeSet::new();
    for descriptor in &removed {
        references(
            &read,
            &descriptor.digest,
            Some(&descriptor.media_type),
            &mut dropped,
            0,
        );
    }
    if !removed.is_empty() && !options.dry_run {
        index.manifests = remaining;
        layout.write_index(&index)?;
    }
    if known {
        let blobs = Blobs::list(layout.path())?;
        remove_blobs(blobs, &keep, &dropped, options, now, &mut report);
    } else {
        report.failed.push(unknown_references(&location));
    }
    report.sort();
    Ok(report)
}

fn prune_base_dir(
    dir: &BaseImageDir,
    options: &PruneOptions,
    now: SystemTime,
) -> Result<PruneReport, CacheError> {
    let location = dir.path().display().to_string();
    let mut report = PruneReport::new(location.clone(), options.dry_run, true);
    let blobs = Blobs::list(dir.path())?;
    let read = |digest: &Digest| dir.read_blob(digest, MAX_MANIFEST_SIZE);

    // The documents: small JSON blobs that parse as a manifest or an index (configs do not).
    let mut documents: BTreeMap<Digest, (AnyManifest, SystemTime)> = BTreeMap::new();
    for file in &blobs.files {
        if file.size > MAX_MANIFEST_SIZE || !blobs.starts_like_json(file) {
            continue;
        }
        let Ok(Some(bytes)) = read(&file.digest) else {
            continue;
        };
        if let Ok(document) = AnyManifest::parse(None, &bytes) {
            documents.insert(file.digest.clone(), (document, file.modified));
        }
    }
    let children: BTreeSet<&Digest> = documents
        .values()
        .filter_map(|(document, _)| match document {
            AnyManifest::Index(index) => Some(index.manifests.iter().map(|d| &d.digest)),
            AnyManifest::Manifest(_) => None,
        })
        .flatten()
        .collect();

    let mut keep = BTreeSet::new();
    let mut dropped = BTreeSet::new();
    let mut known = true;
    for (digest, (_, modified)) in documents.iter().filter(|(d, _)| !children.contains(d)) {
        if expired(*modified, options.older_than, now) {
            report.removed.push(PrunedItem {
                kind: PrunedKind::BaseImage,
                name: digest.to_string(),
                digest: digest.clone(),
                age: age(*modified, now),
            });
            references(&read, digest, None, &mut dropped, 0);
        } else {
            report.kept += 1;
            known &= references(&read, digest, None, &mut keep, 0);
        }
    }
    if known {
        remove_blobs(blobs, &keep, &dropped, options, now, &mut report);
    } else {
        report.failed.push(unknown_references(&location));
    }
    report.sort();
    Ok(report)
}

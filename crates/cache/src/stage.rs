//! Stage records: one document per stage that answers all of a stage's cache lookups in a
//! single request.
//!
//! A stage's step keys chain from its base image's manifest digest and depend on the base's
//! config (its `ENV` feeds expansion, its `ONBUILD` triggers add steps), so without help a fully
//! cached stage costs three rounds in a row: the base manifest, the base config, then the
//! probes. A record removes the last two. It is found by a [`StageLocator`], which is computed
//! from what the build knows before it asks the registry anything (the stage's text, the base
//! as written, the build args, the platform), so the record is fetched at the same time as the
//! base manifest. It carries the base config the stage was keyed with and the cache entry of
//! every cached step, by key.
//!
//! A record is a hint, never an authority: the engine takes the base config from it only when
//! the config's digest is the one the freshly resolved base manifest names, then computes every
//! step key itself and takes a step's entry from the record only when the record holds that
//! very key, fresh by the TTL. Whatever the record cannot answer is probed as usual. So a
//! record can be stale, belong to another context, or be overwritten by a concurrent build
//! without any effect on correctness; at worst it saves nothing.
//!
//! # Format
//!
//! An OCI manifest tagged `stage-<locator hex>` whose config is the record JSON
//! ([`STAGE_RECORD_MEDIA_TYPE`]), stored as a blob and also carried in the config descriptor's
//! `data` field, so a lookup is one request. Its layers are those of the entries it holds (each
//! already in the cache, put there by its own entry), so garbage collection in the registry
//! keeps them as long as the record. Annotations: [`ANNOTATION_KEY`] (the locator) and
//! [`ANNOTATION_CREATED_UNIX`], as step entries have.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use kiln_oci::image::{rfc3339_utc, JsonBlob, ANNOTATION_CREATED};
use kiln_oci::layout::MAX_MANIFEST_SIZE;
use kiln_oci::{
    ContainerConfig, Descriptor, Digest, Hasher, History, ImageFormat, ManifestBuilder, MediaType,
};
use kiln_registry::{BytesSource, PushBlobOptions};
use serde::{Deserialize, Serialize};

use crate::error::CacheError;
use crate::key::CacheKey;
use crate::store::{
    blocking, expired, fresh_manifest, read_small_blob, tag_locked, unix_seconds, Backend,
    CacheStore, ANNOTATION_CREATED_UNIX, ANNOTATION_KEY,
};
use crate::{CacheEntry, CachedLayer};

/// The media type of a stage record's JSON (the config of its manifest).
pub const STAGE_RECORD_MEDIA_TYPE: &str = "application/vnd.dev.kiln.cache.stage.v1+json";

/// Starts every locator's byte stream; bump it when the locator's inputs change meaning.
const LOCATOR_FORMAT: &[u8] = b"kiln-stage-locator-v1";

/// The record's own format number; a record of another format is a miss.
const RECORD_FORMAT: u32 = 1;

/// A record bigger than this is not carried inside its manifest (it is still stored as a
/// blob and read from there).
const MAX_INLINE_RECORD: usize = 256 * 1024;

/// Where a stage's record is found: a digest over length-framed parts the engine knows before
/// it contacts any registry. Two stages that share a locator overwrite each other's records,
/// which costs speed, never correctness (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageLocator(Digest);

impl StageLocator {
    /// The locator over `parts`, each framed by its length so no two lists collide.
    pub fn new<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> StageLocator {
        let mut hasher = Hasher::sha256();
        hasher.update(&(LOCATOR_FORMAT.len() as u64).to_be_bytes());
        hasher.update(LOCATOR_FORMAT);
        for part in parts {
            hasher.update(&(part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        StageLocator(hasher.finish())
    }

    /// The tag the record carries: `stage-` and the 64 hex digits (never a step key's tag).
    pub fn tag(&self) -> String {
        format!("stage-{}", self.0.hex())
    }
}

impl std::fmt::Display for StageLocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// What a stage record holds: the base config the stage's keys were computed with, and the
/// entries of its cached steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageRecord {
    /// The base image the stage was built on, when it was an image.
    pub base: Option<RecordedBase>,
    /// The cache entries of the stage's cached steps.
    pub entries: Vec<CacheEntry>,
}

/// A base image as a record remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedBase {
    /// The platform manifest's digest.
    pub manifest_digest: Digest,
    /// The config document, byte for byte (its digest is checked against the manifest's).
    pub config: Vec<u8>,
}

impl StageRecord {
    /// The base config this record holds for the image whose platform manifest is
    /// `manifest_digest` and names config `config_digest`, if the record was made from that
    /// very image (both digests match the stored bytes).
    pub fn base_config(&self, manifest_digest: &Digest, config_digest: &Digest) -> Option<&[u8]> {
        let base = self.base.as_ref()?;
        (base.manifest_digest == *manifest_digest
            && Digest::sha256_of(&base.config) == *config_digest)
            .then_some(base.config.as_slice())
    }

    /// The entry for `key`, when the record holds it and it is younger than `ttl`.
    pub fn entry(&self, key: &CacheKey, ttl: Duration) -> Option<&CacheEntry> {
        self.entry_at(key, ttl, SystemTime::now())
    }

    /// [`StageRecord::entry`] as of `now` rather than the system clock's time, for callers
    /// that read the time from a [`Clock`](crate::Clock).
    pub fn entry_at(&self, key: &CacheKey, ttl: Duration, now: SystemTime) -> Option<&CacheEntry> {
        self.entries
            .iter()
            .find(|e| e.key == *key && !expired(e.created, ttl, now))
    }
}

/// The record as serialised.
#[derive(Serialize, Deserialize)]
struct RecordDocument {
    format: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<BaseDocument>,
    entries: Vec<EntryDocument>,
}

#[derive(Serialize, Deserialize)]
struct BaseDocument {
    manifest: Digest,
    /// Base64 of the config bytes (kept exact so their digest can be checked).
    config: String,
}

#[derive(Serialize, Deserialize)]
struct EntryDocument {
    key: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layer: Option<LayerDocument>,
    config: ContainerConfig,
    history: History,
    created_unix: u64,
    manifest: Digest,
}

#[derive(Serialize, Deserialize)]
struct LayerDocument {
    descriptor: Descriptor,
    diff_id: Digest,
}

impl RecordDocument {
    fn from_record(record: &StageRecord) -> RecordDocument {
        let base64 = base64::engine::general_purpose::STANDARD;
        RecordDocument {
            format: RECORD_FORMAT,
            base: record.base.as_ref().map(|b| BaseDocument {
                manifest: b.manifest_digest.clone(),
                config: base64.encode(&b.config),
            }),
            entries: record
                .entries
                .iter()
                .map(|e| EntryDocument {
                    key: e.key.digest().clone(),
                    layer: e.layer.as_ref().map(|l| LayerDocument {
                        descriptor: l.descriptor.clone(),
                        diff_id: l.diff_id.clone(),
                    }),
                    config: e.config.clone(),
                    history: e.history.clone(),
                    created_unix: unix_seconds(e.created),
                    manifest: e.manifest_digest.clone(),
                })
                .collect(),
        }
    }

    fn into_record(self, location: &str) -> Result<StageRecord, CacheError> {
        if self.format != RECORD_FORMAT {
            return Err(CacheError::invalid(
                location,
                format!("stage record format {} is not {RECORD_FORMAT}", self.format),
            ));
        }
        let base = match self.base {
            Some(b) => Some(RecordedBase {
                manifest_digest: b.manifest,
                config: base64::engine::general_purpose::STANDARD
                    .decode(b.config)
                    .map_err(|e| CacheError::invalid(location, format!("base config: {e}")))?,
            }),
            None => None,
        };
        let entries = self
            .entries
            .into_iter()
            .map(|e| CacheEntry {
                key: CacheKey::from_digest(e.key),
                layer: e.layer.map(|l| CachedLayer {
                    descriptor: l.descriptor,
                    diff_id: l.diff_id,
                }),
                config: e.config,
                history: e.history,
                created: UNIX_EPOCH + Duration::from_secs(e.created_unix),
                manifest_digest: e.manifest,
            })
            .collect();
        Ok(StageRecord { base, entries })
    }
}

impl CacheStore {
    /// Fetches the record at `locator`: `Ok(None)` when there is none, it is older than the TTL,
    /// or it is not a record for `locator`. One request for a registry cache.
    pub async fn lookup_stage(
        &self,
        locator: &StageLocator,
    ) -> Result<Option<StageRecord>, CacheError> {
        let tag = locator.tag();
        let (location, manifest_bytes) = match &self.backend {
            Backend::Registry { client, repo } => {
                let location = format!("{repo}:{tag}");
                match client.get_manifest(repo, &tag).await {
                    Ok(fetched) => (location, fetched.bytes.to_vec()),
                    Err(err) if err.status().is_some_and(|s| s.as_u16() == 404) => return Ok(None),
                    Err(err) => return Err(err.into()),
                }
            }
            Backend::Layout(layout) => {
                let layout = layout.clone();
                let wanted = tag.clone();
                let found = blocking("stage record lookup", move || {
                    let Some(descriptor) = crate::store::layout_tagged(&layout, &wanted)? else {
                        return Ok(None);
                    };
                    Ok(Some(
                        layout.read_blob_bytes(&descriptor.digest, MAX_MANIFEST_SIZE)?,
                    ))
                })
                .await?;
                match found {
                    Some(bytes) => (format!("{}:{tag}", self.location()), bytes),
                    None => return Ok(None),
                }
            }
        };
        let Some((manifest, _)) =
            fresh_manifest(&manifest_bytes, &location, self.ttl(), self.clock.now())?
        else {
            return Ok(None);
        };
        if manifest.annotations.get(ANNOTATION_KEY).map(String::as_str)
            != Some(&locator.to_string())
            || manifest.config.media_type != MediaType::Other(STAGE_RECORD_MEDIA_TYPE.into())
        {
            return Ok(None);
        }
        let bytes = match manifest.config.embedded_data() {
            Some(bytes) => bytes,
            None => match &self.backend {
                Backend::Registry { client, repo } => {
                    read_small_blob(client, repo, &manifest.config.digest, MAX_MANIFEST_SIZE)
                        .await?
                }
                Backend::Layout(layout) => {
                    layout.read_blob_bytes(&manifest.config.digest, MAX_MANIFEST_SIZE)?
                }
            },
        };
        let document: RecordDocument = serde_json::from_slice(&bytes)
            .map_err(|e| CacheError::invalid(&location, format!("stage record: {e}")))?;
        document.into_record(&location).map(Some)
    }

    /// Writes `record` at `locator`, replacing any record there.
    pub async fn store_stage(
        &self,
        locator: &StageLocator,
        record: &StageRecord,
    ) -> Result<(), CacheError> {
        let what = || format!("stage record {locator}");
        let bytes = serde_json::to_vec(&RecordDocument::from_record(record))
            .map_err(|e| CacheError::invalid(what(), e.to_string()))?;
        let blob = JsonBlob {
            digest: Digest::sha256_of(&bytes),
            bytes,
            media_type: MediaType::Other(STAGE_RECORD_MEDIA_TYPE.into()),
        };
        let created = self.clock.now();
        let seconds = unix_seconds(created);
        let config_descriptor = if blob.bytes.len() <= MAX_INLINE_RECORD {
            blob.descriptor_with_data()
        } else {
            blob.descriptor()
        };
        // The entries' layers are listed too (they are in the cache already: every entry put
        // its own there), so a registry's garbage collection keeps them while the record lives.
        let mut layers: Vec<Descriptor> = Vec::new();
        for layer in record.entries.iter().filter_map(|e| e.layer.as_ref()) {
            if !layers.iter().any(|l| l.digest == layer.descriptor.digest) {
                layers.push(layer.descriptor.clone());
            }
        }
        let manifest = ManifestBuilder::new(ImageFormat::Oci)
            .config_descriptor(config_descriptor)
            .layers(layers)
            .annotation(ANNOTATION_KEY, &locator.to_string())
            .annotation(ANNOTATION_CREATED_UNIX, &seconds.to_string())
            .annotation(ANNOTATION_CREATED, &rfc3339_utc(seconds as i64))
            .build()
            .and_then(|m| m.to_blob())
            .map_err(|source| CacheError::Image {
                what: what(),
                source,
            })?;
        let tag = locator.tag();
        match &self.backend {
            Backend::Registry { client, repo } => {
                client
                    .push_blob(
                        repo,
                        &BytesSource(Bytes::from(blob.bytes.clone())),
                        &PushBlobOptions {
                            digest: Some(blob.digest.clone()),
                            mount_from: None,
                        },
                    )
                    .await?;
                client
                    .put_manifest(
                        repo,
                        &tag,
                        &manifest.media_type,
                        Bytes::from(manifest.bytes),
                    )
                    .await?;
            }
            Backend::Layout(layout) => {
                let layout = layout.clone();
                blocking("stage record write", move || {
                    layout.write_json_blob(&blob)?;
                    let descriptor = layout.write_json_blob(&manifest)?;
                    tag_locked(&layout, &tag, descriptor)
                })
                .await?;
            }
        }
        Ok(())
    }
}

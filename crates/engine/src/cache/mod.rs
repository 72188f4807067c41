//! The layer cache as the engine uses it (`--cache`): every step's key is computed before the
//! stage runs, all keys are probed at once, hits are taken without executing anything, and
//! the layers of steps that did run are written to the cache in the background. A stage record
//! (kiln-cache's `stage` module) is fetched with the base manifest and answers every probe it
//! can, so an unchanged stage costs one round; it is rewritten when it answered less than all.
//!
//! The keys themselves and the storage formats live in kiln-cache; each operation's module
//! says what the operation observes (`ops::key_input`), and this module chains those over the
//! stage, replaying the operations' config edits so each step is keyed with the config it
//! runs with.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_cache::{
    CacheEntry, CacheError, CacheKey, CacheStore, CachedLayer, KeyChain, LayerFile, NewEntry,
    Parent, RecordedBase, StageLocator, StageRecord,
};
use kiln_fs::blobstore::BlobStore;
use kiln_oci::image::{ContainerConfig, History, ImageConfig};
use kiln_oci::{Digest, Platform};
use kiln_plan::{Operation, Step};
use tokio::io::AsyncReadExt;

use crate::base::ImageLayer;
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink};
use crate::ops::{self, KeyInputs};

/// The engine's cache settings and the store behind them, shared by every stage of a build.
pub struct EngineCache {
    /// Where entries are read and written.
    pub store: CacheStore,
    /// Whether new entries are written (`--no-push-cache` turns this off).
    pub write: bool,
    /// Whether RUN layers are looked up and stored (`--cache-run-layers`).
    pub run_layers: bool,
    /// `--force-build-metadata`: every step makes a layer, so its entries are keyed apart.
    pub every_step_layered: bool,
    /// The platform being built (part of every key).
    pub platform: Platform,
    events: EventSink,
    health: Arc<Health>,
    lookup_deadline: Duration,
    writes: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Whether the cache can still be asked, and written. A request that gets no answer has
/// already waited out the registry client's retries; asking again for every probe and every
/// write would make a build whose cache is down wait that long each time, so the first such
/// failure ends the cache's use for the build. A write the cache refuses (after the client's
/// retries) ends the writes: a cache that refuses one entry (read-only, no push permission)
/// refuses the next, and one warning says so instead of one per step.
#[derive(Default)]
struct Health {
    unreachable: AtomicBool,
    writes_stopped: AtomicBool,
}

impl Health {
    fn reachable(&self) -> bool {
        !self.unreachable.load(Ordering::SeqCst)
    }

    fn writable(&self) -> bool {
        self.reachable() && !self.writes_stopped.load(Ordering::SeqCst)
    }

    /// Reports `message`, a failed lookup: always for a cache that answered, once for one
    /// that could not be reached (`unreachable`).
    fn failed(&self, events: &EventSink, message: String, unreachable: bool) {
        if !unreachable {
            events(BuildEvent::Warning { message });
            return;
        }
        if !self.unreachable.swap(true, Ordering::SeqCst) {
            events(BuildEvent::Warning {
                message: format!(
                    "{message}; the layer cache is not used for the rest of this build"
                ),
            });
        }
    }

    /// Reports `message`, a failed write, once: the first one stops the writes.
    fn write_failed(&self, events: &EventSink, message: String, unreachable: bool) {
        if unreachable {
            return self.failed(events, message, true);
        }
        if !self.writes_stopped.swap(true, Ordering::SeqCst) && self.reachable() {
            events(BuildEvent::Warning {
                message: format!(
                    "{message}; nothing more is written to the layer cache in this build"
                ),
            });
        }
    }
}

/// What the cache knows about one stage before it runs: each step's key (`None` from the
/// first step whose inputs cannot be pinned) and each layer step's entry when it is a hit.
#[derive(Debug, Default)]
pub struct StagePlan {
    /// Key per step.
    pub keys: Vec<Option<CacheKey>>,
    /// Entry per step, for steps that are hits.
    pub hits: Vec<Option<CacheEntry>>,
    /// The key after the last step: what a stage built FROM this one, or a `COPY --from` of
    /// it, is keyed by.
    pub final_key: Option<CacheKey>,
    /// Where the stage's record is kept, when the stage has one.
    pub locator: Option<StageLocator>,
    /// Whether a stage record answered every probe, so it needs no rewriting.
    pub answered_by_record: bool,
}

impl StagePlan {
    /// Forgets the keys and hits of `step` and every step after it (their keys chain from
    /// it): nothing of them is stored or taken from the cache, and the stage has no final key.
    pub fn unkey_from(&mut self, step: usize) {
        for later in step..self.keys.len() {
            self.keys[later] = None;
        }
        for later in step..self.hits.len() {
            self.hits[later] = None;
        }
        self.final_key = None;
    }

    /// Whether every layer step of `steps` is a hit and at least one step is: the stage runs
    /// nothing, needs no tree, and its image is made of blobs that an identical earlier build
    /// already pushed.
    pub fn fully_cached(&self, steps: &[Step]) -> bool {
        let mut any_hit = false;
        for (i, step) in steps.iter().enumerate() {
            let hit = self.hits.get(i).is_some_and(Option::is_some);
            if step.operation.writes_files() && !hit {
                return false;
            }
            any_hit |= hit;
        }
        any_hit
    }
}

/// A cached step's entry as a stage record will hold it: known (a hit) or still being written.
pub enum RecordSlot {
    /// The entry the step was a hit on.
    Known(Box<CacheEntry>),
    /// The entry being written in the background; the sender is dropped if the write fails.
    Pending(tokio::sync::oneshot::Receiver<CacheEntry>),
}

impl EngineCache {
    /// An engine cache over `store`, reporting failed cache requests to `events` and giving
    /// up on a cache whose lookups take longer than `lookup_deadline`.
    pub fn new(
        store: CacheStore,
        write: bool,
        run_layers: bool,
        platform: Platform,
        events: EventSink,
        lookup_deadline: Duration,
    ) -> Self {
        EngineCache {
            store,
            write,
            run_layers,
            every_step_layered: false,
            platform,
            events,
            health: Arc::new(Health::default()),
            lookup_deadline,
            writes: Mutex::new(Vec::new()),
        }
    }

    /// Computes every step's key and probes the store for all layer steps at once. A store
    /// that cannot be reached makes every step a miss, with a warning.
    pub fn plan_stage(
        &self,
        runtime: &tokio::runtime::Handle,
        parent: Option<Parent>,
        steps: &[Step],
        start: &ImageConfig,
        keys: &KeyInputs<'_>,
        record: Option<&StageRecord>,
    ) -> StagePlan {
        let (step_keys, final_key) = self.step_keys(parent, steps, start, keys);
        let mut hits = vec![None; steps.len()];
        let mut probe: Vec<(usize, CacheKey)> = Vec::new();
        for (i, (step, key)) in steps.iter().zip(&step_keys).enumerate() {
            let Some(key) = key.as_ref().filter(|_| self.caches(&step.operation)) else {
                continue;
            };
            match record.and_then(|r| r.entry(key, self.store.ttl())) {
                Some(entry) => hits[i] = Some(entry.clone()),
                None => probe.push((i, key.clone())),
            }
        }
        let answered_by_record = record.is_some() && probe.is_empty();
        if !probe.is_empty() && self.health.reachable() {
            let only_keys: Vec<CacheKey> = probe.iter().map(|(_, k)| k.clone()).collect();
            let found = runtime.block_on(self.within_deadline(self.store.lookup_all(&only_keys)));
            let mut warned = false;
            for ((i, _), result) in probe.iter().zip(found.unwrap_or_default()) {
                match result {
                    Ok(entry) => hits[*i] = entry,
                    Err(e) if !warned => {
                        warned = true;
                        let unreachable = e.is_unreachable();
                        self.health
                            .failed(&self.events, self.unavailable(&e), unreachable);
                    }
                    Err(_) => {}
                }
            }
        }
        StagePlan {
            keys: step_keys,
            hits,
            final_key,
            locator: None,
            answered_by_record,
        }
    }

    /// Where the record of a stage is kept: over the platform, the plan's identity (a
    /// Dockerfile's text and build args), the stage's id and what it is built on as written (or
    /// the final key of the stage it is built on). Known before any registry is asked.
    pub fn stage_locator(&self, identity: &str, stage: usize, base: &str) -> StageLocator {
        let platform = self.platform.to_string();
        let stage = stage.to_string();
        StageLocator::new(vec![
            platform.as_bytes(),
            identity.as_bytes(),
            stage.as_bytes(),
            base.as_bytes(),
        ])
    }

    /// Fetches the stage record at `locator`; an unreadable one is simply absent (the probes
    /// it would have answered report a cache that answers with errors), and an unreachable
    /// cache is reported here, since nothing will ask it again.
    pub async fn lookup_record(&self, locator: &StageLocator) -> Option<StageRecord> {
        if !self.health.reachable() {
            return None;
        }
        match self
            .within_deadline(self.store.lookup_stage(locator))
            .await?
        {
            Ok(record) => record,
            Err(e) => {
                if e.is_unreachable() {
                    self.health.failed(&self.events, self.unavailable(&e), true);
                }
                None
            }
        }
    }

    /// `lookup`'s outcome, or `None` (with the one warning, and the cache given up) when it
    /// takes longer than the lookup deadline.
    async fn within_deadline<T>(&self, lookup: impl std::future::Future<Output = T>) -> Option<T> {
        let outcome = tokio::time::timeout(self.lookup_deadline, lookup)
            .await
            .ok();
        if outcome.is_none() {
            let message = format!(
                "layer cache {} did not answer within {} s, building without it",
                self.store.location(),
                self.lookup_deadline.as_secs_f64()
            );
            self.health.failed(&self.events, message, true);
        }
        outcome
    }

    fn unavailable(&self, error: &CacheError) -> String {
        format!(
            "layer cache {} unavailable, building without it: {error}",
            self.store.location()
        )
    }

    /// Writes a stage's record in the background once every entry in `slots` is written; a
    /// failed entry write leaves the record unwritten, a failed record write is a warning.
    pub fn record_in_background(
        &self,
        runtime: &tokio::runtime::Handle,
        locator: StageLocator,
        base: Option<RecordedBase>,
        slots: Vec<RecordSlot>,
    ) {
        if !self.write {
            return;
        }
        let store = self.store.clone();
        let events = self.events.clone();
        let health = self.health.clone();
        let task = runtime.spawn(async move {
            let mut entries = Vec::with_capacity(slots.len());
            for slot in slots {
                match slot {
                    RecordSlot::Known(entry) => entries.push(*entry),
                    RecordSlot::Pending(receiver) => match receiver.await {
                        Ok(entry) => entries.push(entry),
                        // The entry's own write failed and warned: a record without it would
                        // answer less than the per-step lookups do.
                        Err(_) => return,
                    },
                }
            }
            if !health.writable() {
                return;
            }
            let record = StageRecord { base, entries };
            if let Err(e) = store.store_stage(&locator, &record).await {
                let message = format!(
                    "could not write stage record {} to {}: {e}",
                    locator.tag(),
                    store.location()
                );
                health.write_failed(&events, message, e.is_unreachable());
            }
        });
        self.writes.lock().expect("cache writes").push(task);
    }

    /// Whether steps doing `operation` are looked up and stored.
    fn caches(&self, operation: &Operation) -> bool {
        match operation {
            Operation::Run(_) => self.run_layers,
            other => other.writes_files(),
        }
    }

    /// Each step's key (`None` from the first step whose inputs cannot be pinned) and the key
    /// a stage built on this one chains from.
    fn step_keys(
        &self,
        parent: Option<Parent>,
        steps: &[Step],
        start: &ImageConfig,
        keys: &KeyInputs<'_>,
    ) -> (Vec<Option<CacheKey>>, Option<CacheKey>) {
        let Some(parent) = parent else {
            return (vec![None; steps.len()], None);
        };
        let mut chain = KeyChain::new(parent, self.platform.clone());
        if self.every_step_layered {
            chain = chain.every_step_layered();
        }
        let mut image = start.clone();
        let mut state = ops::config::EditState::new(&image.config);
        let mut out = Vec::with_capacity(steps.len());
        for step in steps {
            // The config follows the steps, so a run's key sees the user, working directory and
            // shell in force where it stands.
            let input = ops::key_input(&step.operation, &image, keys);
            ops::edit_config(&step.operation, &mut image, &mut state);
            match input {
                Some(input) => out.push(Some(chain.next_key(&input))),
                None => {
                    out.resize(steps.len(), None);
                    return (out, None);
                }
            }
        }
        let final_key = match chain.current() {
            Parent::Key(key) => Some(key.clone()),
            _ => None,
        };
        (out, final_key)
    }

    /// Writes the entry of a step that ran, in the background; a failure is a warning. The slot
    /// returned delivers the entry once written, for the stage record (`None` when nothing is
    /// written: no cache writes, or a step kind that is not cached). A layer that `uploads`
    /// is sending to a destination on the cache's registry is mounted from there once it
    /// arrives, not uploaded twice.
    #[allow(clippy::too_many_arguments)]
    pub fn store_in_background(
        &self,
        runtime: &tokio::runtime::Handle,
        key: CacheKey,
        operation: &Operation,
        layer: Option<(&ImageLayer, &Path)>,
        uploads: Option<&crate::output::PushAhead>,
        config: &ContainerConfig,
        history: &History,
    ) -> Option<RecordSlot> {
        if !self.write || !self.caches(operation) {
            return None;
        }
        let shared_upload = match (uploads, layer, self.store.repository()) {
            (Some(uploads), Some((layer, _)), Some(cache_repo)) => {
                uploads.upload_on(cache_repo.registry(), &layer.descriptor.digest)
            }
            _ => None,
        };
        let (written, slot) = tokio::sync::oneshot::channel();
        let mut entry = NewEntry {
            key,
            platform: self.platform.clone(),
            layer: layer.map(|(layer, path)| LayerFile {
                descriptor: layer.descriptor.clone(),
                diff_id: layer.diff_id.clone(),
                path: path.to_path_buf(),
                mount_from: None,
            }),
            config: config.clone(),
            history: history.clone(),
        };
        let store = self.store.clone();
        let events = self.events.clone();
        let health = self.health.clone();
        let task = runtime.spawn(async move {
            if let (Some((repo, mut done)), Some(layer)) = (shared_upload, entry.layer.as_mut()) {
                let arrived = done.wait_for(Option::is_some).await;
                if arrived.is_ok_and(|finished| *finished == Some(true)) {
                    layer.mount_from = Some(repo);
                }
            }
            if !health.writable() {
                return;
            }
            match store.store(&entry).await {
                Ok(stored) => {
                    let _ = written.send(stored.entry);
                }
                Err(e) => {
                    let message = format!(
                        "could not write cache entry {} to {}: {e}",
                        entry.key,
                        store.location()
                    );
                    health.write_failed(&events, message, e.is_unreachable());
                }
            }
        });
        self.writes.lock().expect("cache writes").push(task);
        Some(RecordSlot::Pending(slot))
    }

    /// Waits for the background writes (a build's cache is complete when the build ends).
    pub async fn finish_writes(&self) {
        let tasks = std::mem::take(&mut *self.writes.lock().expect("cache writes"));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// The image layer a cache hit contributes: its blob is in the cache repository (mounted
    /// from there at push time) or, for an OCI-layout cache, copied into the blob store.
    pub fn hit_layer(
        &self,
        runtime: &tokio::runtime::Handle,
        blobs: &BlobStore,
        cached: &CachedLayer,
    ) -> Result<ImageLayer, BuildError> {
        let origin = self.store.repository().cloned();
        if origin.is_none() {
            self.fetch_blob(runtime, blobs, cached)?;
        }
        Ok(ImageLayer {
            descriptor: cached.descriptor.clone(),
            diff_id: cached.diff_id.clone(),
            origin,
        })
    }

    /// Copies a cached layer's blob into the build's blob store (to unpack it, or to write it
    /// into a local output).
    pub fn fetch_blob(
        &self,
        runtime: &tokio::runtime::Handle,
        blobs: &BlobStore,
        cached: &CachedLayer,
    ) -> Result<(), BuildError> {
        let digest = &cached.descriptor.digest;
        if blobs.contains(digest) {
            return Ok(());
        }
        runtime.block_on(async {
            let mut reader = self
                .store
                .open_layer(cached)
                .await
                .map_err(|e| BuildError::image(format!("cache layer {digest}"), e))?;
            let mut file = blobs
                .create()
                .map_err(|e| BuildError::image("blob store", e))?;
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = reader
                    .read(&mut buf)
                    .await
                    .map_err(|e| BuildError::image(format!("cache layer {digest}"), e))?;
                if n == 0 {
                    break;
                }
                std::io::Write::write_all(&mut file, &buf[..n]).map_err(|source| {
                    BuildError::Io {
                        path: blobs.root().to_path_buf(),
                        source,
                    }
                })?;
            }
            // The cache store verified the digest as the stream was read.
            file.commit(digest)
                .map_err(|e| BuildError::image("blob store", e))?;
            Ok(())
        })
    }
}

/// The parent key of a stage whose base is an image with manifest `digest`.
pub(crate) fn image_parent(digest: &Digest) -> Parent {
    Parent::Image(digest.clone())
}

//! The layer cache as the engine uses it (`--cache`): every step's key is computed before the
//! stage runs, all keys are probed at once, hits are taken without executing anything, and
//! the layers of steps that did run are written to the cache in the background. A stage record
//! (kiln-cache's `stage` module) is fetched with the base manifest and answers every probe it
//! can, so an unchanged stage costs one round; it is rewritten when it answered less than all.
//!
//! The keys themselves and the storage formats live in kiln-cache; this module decides what
//! each step can observe (its [`StepInput`]) from the engine's view of the stage.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_cache::{
    AddInput, CacheEntry, CacheError, CacheKey, CacheStore, CachedLayer, CopyInput, KeyChain,
    LayerFile, NewEntry, Parent, RecordedBase, RemoteSource, RemoteValidator, RunInput,
    SourceContent, StageLocator, StageRecord, StepInput,
};
use kiln_context::{BuildContext, ContextHasher as ContentHasher, HashOptions};
use kiln_dockerfile::{FileSource, Instruction, Source, Step};
use kiln_fs::blobstore::BlobStore;
use kiln_oci::image::{ContainerConfig, History};
use kiln_oci::{Digest, Platform};
use tokio::io::AsyncReadExt;

use crate::base::ImageLayer;
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink};
use crate::metadata;
use crate::remote::UrlPin;

/// The engine's cache settings and the store behind them, shared by every stage of a build.
pub struct EngineCache {
    /// Where entries are read and written.
    pub store: CacheStore,
    /// Whether new entries are written (`--no-push-cache` turns this off).
    pub write: bool,
    /// Whether RUN layers are looked up and stored (`--cache-run-layers`).
    pub run_layers: bool,
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
            if is_layer_step(&step.instruction) && !hit {
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

/// Whether `instruction` is a step that may produce a layer and so has a cache entry.
pub fn is_layer_step(instruction: &Instruction) -> bool {
    matches!(
        instruction,
        Instruction::Run(_) | Instruction::Copy(_) | Instruction::Add(_) | Instruction::Workdir(_)
    )
}

/// What a stage's keys need from the rest of the build.
pub struct KeyContext<'a> {
    /// The build context, for COPY/ADD sources and bind mounts.
    pub context: &'a BuildContext,
    /// Final keys of the stages built so far.
    pub stage_key: &'a dyn Fn(usize) -> Option<CacheKey>,
    /// Image digests and URL validators or contents, pinned before the stage is keyed.
    pub remote: &'a crate::remote::RemotePins,
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
        start: &ContainerConfig,
        keys: &KeyContext<'_>,
        record: Option<&StageRecord>,
    ) -> StagePlan {
        let step_keys = self.step_keys(parent, steps, start, keys);
        let mut hits = vec![None; steps.len()];
        let mut probe: Vec<(usize, CacheKey)> = Vec::new();
        for (i, (step, key)) in steps.iter().zip(&step_keys).enumerate() {
            let Some(key) = key.as_ref().filter(|_| self.caches(&step.instruction)) else {
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
        let final_key = step_keys.last().cloned().flatten();
        StagePlan {
            keys: step_keys,
            hits,
            final_key,
            locator: None,
            answered_by_record,
        }
    }

    /// Where the record of a stage is kept: over the platform, the Dockerfile's text, the
    /// stage's index, what it is built on as written (or the final key of the stage it is
    /// built FROM) and the build args. Known before any registry is asked.
    pub fn stage_locator(
        &self,
        dockerfile: &str,
        stage: usize,
        base: &str,
        build_args: &BTreeMap<String, String>,
    ) -> StageLocator {
        let platform = self.platform.to_string();
        let stage = stage.to_string();
        let mut parts: Vec<&[u8]> = vec![
            platform.as_bytes(),
            dockerfile.as_bytes(),
            stage.as_bytes(),
            base.as_bytes(),
        ];
        for (name, value) in build_args {
            parts.push(name.as_bytes());
            parts.push(value.as_bytes());
        }
        StageLocator::new(parts)
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

    /// Whether steps like `instruction` are looked up and stored.
    fn caches(&self, instruction: &Instruction) -> bool {
        match instruction {
            Instruction::Run(_) => self.run_layers,
            other => is_layer_step(other),
        }
    }

    fn step_keys(
        &self,
        parent: Option<Parent>,
        steps: &[Step],
        start: &ContainerConfig,
        keys: &KeyContext<'_>,
    ) -> Vec<Option<CacheKey>> {
        let Some(parent) = parent else {
            return vec![None; steps.len()];
        };
        let mut chain = KeyChain::new(parent, self.platform.clone());
        let mut config = start.clone();
        let mut cmd_inherited = config.cmd.is_some();
        let mut out = Vec::with_capacity(steps.len());
        let mut broken = false;
        let hasher = ContentHasher::new();
        for step in steps {
            if broken {
                out.push(None);
                continue;
            }
            let input = step_input(step, &config, keys, &hasher);
            // The simulated config follows the steps, so a RUN's key sees the USER, WORKDIR
            // and SHELL in force where it stands.
            match &step.instruction {
                Instruction::Workdir(dir) => {
                    let current = config.working_dir.clone().unwrap_or_else(|| "/".into());
                    let absolute = Path::new("/").join(&current).join(dir);
                    let rel = crate::copy::clean_relative(&absolute);
                    config.working_dir = Some(format!("/{}", rel.display()));
                }
                Instruction::Run(_)
                | Instruction::Copy(_)
                | Instruction::Add(_)
                | Instruction::Arg(_)
                | Instruction::Maintainer(_) => {}
                other => {
                    metadata::apply(&mut config, other, &mut cmd_inherited);
                }
            }
            match input {
                Some(input) => out.push(Some(chain.next_key(&input))),
                None => {
                    broken = true;
                    out.push(None);
                }
            }
        }
        out
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
        instruction: &Instruction,
        layer: Option<(&ImageLayer, &Path)>,
        uploads: Option<&crate::output::PushAhead>,
        config: &ContainerConfig,
        history: &History,
    ) -> Option<RecordSlot> {
        if !self.write || !self.caches(instruction) {
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
                .map_err(|e| BuildError::Image(format!("cache layer {digest}: {e}")))?;
            let mut file = blobs
                .create()
                .map_err(|e| BuildError::Image(format!("blob store: {e}")))?;
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = reader
                    .read(&mut buf)
                    .await
                    .map_err(|e| BuildError::Image(format!("cache layer {digest}: {e}")))?;
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
                .map_err(|e| BuildError::Image(format!("blob store: {e}")))?;
            Ok(())
        })
    }
}

/// What `step` can observe, or `None` when some input cannot be pinned (an image or URL that
/// [`crate::remote::RemotePins`] could not pin, a source that does not resolve):
/// the chain stops there and the rest of the stage runs uncached.
fn step_input(
    step: &Step,
    config: &ContainerConfig,
    keys: &KeyContext<'_>,
    hasher: &ContentHasher,
) -> Option<StepInput> {
    Some(match &step.instruction {
        Instruction::Run(command) => {
            let mut bind_contents = BTreeMap::new();
            for mount in command
                .mounts
                .iter()
                .filter(|m| kiln_cache::key::reads_source(m))
            {
                let content = match &mount.from {
                    None => context_content(
                        keys.context,
                        hasher,
                        &[mount.source.clone().unwrap_or_else(|| ".".into())],
                    )?,
                    Some(Source::Stage(i)) => SourceContent::Stage((keys.stage_key)(*i)?),
                    Some(Source::Image(image)) => SourceContent::Image(keys.remote.image(image)?),
                };
                bind_contents.insert(mount.target.clone(), content);
            }
            StepInput::Run(RunInput {
                command: command.clone(),
                env: kiln_cache::key::step_run_environment(step),
                user: config.user.clone().unwrap_or_default(),
                workdir: config.working_dir.clone().unwrap_or_else(|| "/".into()),
                shell: metadata::shell(config),
                bind_contents,
            })
        }
        Instruction::Copy(files) => {
            let content = match &files.from {
                None => context_content(keys.context, hasher, &paths(&files.sources))?,
                Some(Source::Stage(i)) => SourceContent::Stage((keys.stage_key)(*i)?),
                Some(Source::Image(image)) => SourceContent::Image(keys.remote.image(image)?),
            };
            StepInput::Copy(CopyInput {
                files: files.clone(),
                content,
            })
        }
        Instruction::Add(files) => {
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for path in paths(&files.sources) {
                if crate::fetch::is_git_source(&path) {
                    let commit = keys.remote.git(&path)?;
                    remote.push(RemoteSource {
                        url: path,
                        validator: RemoteValidator::GitCommit(commit.id),
                    });
                    continue;
                }
                if crate::fetch::is_http_url(&path) {
                    let validator = match &files.checksum {
                        Some(checksum) => RemoteValidator::Checksum(checksum.to_string()),
                        None => match keys.remote.url(&path)? {
                            UrlPin::Validators(validators) => RemoteValidator::Http {
                                etag: validators.etag,
                                last_modified: validators.last_modified,
                            },
                            UrlPin::Downloaded(downloaded) => {
                                RemoteValidator::Content(downloaded.digest)
                            }
                        },
                    };
                    remote.push(RemoteSource {
                        url: path,
                        validator,
                    });
                } else {
                    local.push(path);
                }
            }
            let local = if local.is_empty() {
                SourceContent::None
            } else {
                context_content(keys.context, hasher, &local)?
            };
            StepInput::Add(AddInput {
                files: files.clone(),
                local,
                remote,
            })
        }
        other => StepInput::Metadata(other.clone()),
    })
}

fn paths(sources: &[FileSource]) -> Vec<String> {
    sources
        .iter()
        .filter_map(|s| match s {
            FileSource::Path(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// The content hash of context sources; `None` when one does not resolve (the step itself
/// then fails with the real error).
fn context_content(
    context: &BuildContext,
    hasher: &ContentHasher,
    sources: &[String],
) -> Option<SourceContent> {
    if sources.is_empty() {
        return Some(SourceContent::None);
    }
    let mut matches = Vec::new();
    for source in sources {
        matches.extend(context.resolve_sources(source).ok()?);
    }
    let digest = context
        .hash_sources(
            hasher,
            &matches,
            HashOptions {
                include_owner: false,
            },
        )
        .ok()?;
    Some(SourceContent::Tree(digest))
}

/// The parent key of a stage whose base is an image with manifest `digest`.
pub fn image_parent(digest: &Digest) -> Parent {
    Parent::Image(digest.clone())
}

//! Executes one stage: prepares its rootfs from its base, runs each step, and turns each step's
//! changes into a layer in the blob store. Blocking code: it runs on a blocking thread and
//! reaches the registry through the runtime handle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_context::{BuildContext, TreeView};
use kiln_dockerfile::{Base, FileSource, Instruction, Plan, Source, Step};
use kiln_fs::blobstore::BlobStore;
use kiln_fs::layer::{write_layer, LayerOptions};
use kiln_fs::resolve::Root;
use kiln_fs::snapshot::{ChangeKind, Diff, IgnoreOptions, Index, SnapshotOptions, Snapshotter};
use kiln_oci::image::{Descriptor, History, ImageConfig};
use kiln_oci::{MediaType, Platform};
use kiln_registry::Client;
use kiln_sandbox::{Mode, Sandbox};

use crate::base::{self, ImageLayer};
use crate::cache_mount::CacheMountStore;
use crate::copy::{self, CopyRequest, SourceTree};
use crate::error::BuildError;
use crate::events::{BuildEvent, EventSink, Phase};
use crate::inplace;
use crate::metadata;
use crate::options::BuildOptions;
use crate::remote::UrlPin;
use crate::run::{self, MountSource, RunContext};

/// A finished stage: what later stages (`FROM stage`, `COPY --from`) and the image need.
#[derive(Debug)]
pub struct StageOutput {
    /// The stage's rootfs directory; read it through [`Shared::stage_rootfs`], which fills it
    /// from the layers when the stage never needed it itself.
    pub rootfs: PathBuf,
    /// Whether `rootfs` holds the stage's tree. A stage whose steps were all cache hits (or one
    /// built in place, whose `/` the next stage wipes) leaves it empty until someone asks.
    pub ready: Mutex<bool>,
    /// Its image config (history and diff IDs included).
    pub config: ImageConfig,
    /// Its layers, bottom first.
    pub layers: Vec<ImageLayer>,
    /// Its environment, inherited by a stage built FROM it.
    pub env: Vec<(String, String)>,
    /// The base image, when the stage (or the stage it starts from) came from one.
    pub base_image: Option<(String, kiln_oci::Digest)>,
    /// The cache key after the stage's last step, when the layer cache is on and every step
    /// could be keyed.
    pub cache_key: Option<kiln_cache::CacheKey>,
    /// Whether every layer step was a cache hit (nothing ran, nothing was pushed ahead).
    pub fully_cached: bool,
}

/// An image unpacked for `COPY --from=IMAGE` or `RUN --mount=from=IMAGE`.
#[derive(Debug, Clone)]
pub struct ImageTree {
    /// Where its file system is unpacked.
    pub root: PathBuf,
    /// The platform manifest it was pulled by.
    pub manifest_digest: kiln_oci::Digest,
}

/// Everything stages share during one build.
pub struct Shared {
    /// The build's options.
    pub options: BuildOptions,
    /// Registry client.
    pub client: Client,
    /// Content-addressed blobs of this build (and earlier ones in the same Kiln dir).
    pub blobs: BlobStore,
    /// The build context.
    pub context: BuildContext,
    /// The Dockerfile's name as given, for error messages.
    pub dockerfile_name: String,
    /// The Dockerfile's text, for history entries.
    pub dockerfile_lines: Vec<String>,
    /// The plan.
    pub plan: Plan,
    /// The platform being built.
    pub platform: Platform,
    /// This build's work directory.
    pub work_dir: PathBuf,
    /// How RUN is isolated.
    pub mode: Mode,
    /// Event sink.
    pub events: EventSink,
    /// Runtime handle for registry calls from blocking code.
    pub runtime: tokio::runtime::Handle,
    /// Finished stages.
    pub stages: Mutex<HashMap<usize, Arc<StageOutput>>>,
    /// Images used by `COPY --from=IMAGE` and `RUN --mount=from=IMAGE`, unpacked once each.
    pub images: Mutex<HashMap<String, ImageTree>>,
    /// Uploads layers of the final image while the build goes on, when it is pushed.
    pub push_ahead: Option<crate::output::PushAhead>,
    /// The stages whose layers end up in the final image: the target and the stages it is
    /// built FROM, transitively.
    pub image_stages: std::collections::HashSet<usize>,
    /// The layer cache, when `--cache` is on.
    pub cache: Option<crate::cache::EngineCache>,
    /// Remote inputs pinned for the cache keys (only filled when the cache is on).
    pub remote: crate::remote::RemotePins,
    /// Paths RUN steps must not read (in-place: where the push credentials are).
    pub hidden: Vec<PathBuf>,
}

impl Shared {
    fn emit(&self, event: BuildEvent) {
        (self.events)(event)
    }

    /// Pulls base `image` and unpacks it into the stage's tree: `rootfs` (indexing it in
    /// `index`), or `/` in in-place mode (`in_place_ignore` given), sparing ignored paths.
    /// Layers download and unpack at the same time, so the two are one `pull` phase.
    fn pull_base_into(
        &self,
        stage: usize,
        from_line: usize,
        image: &str,
        in_place_ignore: Option<&IgnoreOptions>,
        rootfs: &Path,
        index: &mut Index,
    ) -> Result<base::PulledImage, BuildError> {
        let cache_dir = self.options.cache.dir.as_deref();
        self.timed(Some(stage), None, Phase::Pull, || match in_place_ignore {
            Some(ignore) => {
                let pulled = self.runtime.block_on(base::pull(
                    &self.client,
                    &self.blobs,
                    image,
                    &self.platform,
                    &*self.events,
                    cache_dir,
                ))?;
                let ignore = inplace::ignore_set(ignore)?;
                inplace::unpack_into_root(&pulled.layers, &self.blobs, &ignore)?;
                Ok(pulled)
            }
            None => base::pull_and_unpack(
                &self.runtime,
                &self.client,
                &self.blobs,
                image,
                &self.platform,
                &self.events,
                rootfs,
                index,
                cache_dir,
            ),
        })
        .map_err(|e: BuildError| self.step_error(from_line, format!("FROM {image}: {e}")))
    }

    /// Runs `work`, reporting its duration as `phase` of `stage` (and `step`) for the timing
    /// report.
    pub fn timed<T>(
        &self,
        stage: Option<usize>,
        step: Option<usize>,
        phase: Phase,
        work: impl FnOnce() -> T,
    ) -> T {
        let started = Instant::now();
        let result = work();
        self.emit(BuildEvent::PhaseFinished {
            stage,
            step,
            phase,
            duration: started.elapsed(),
        });
        result
    }

    /// Starts pushing `layers` ahead when stage `index` is part of the final image.
    fn push_ahead(&self, index: usize, layers: &[ImageLayer]) {
        if let Some(pusher) = self.push_ahead.as_ref() {
            if self.image_stages.contains(&index) {
                layers.iter().for_each(|layer| pusher.start(layer));
            }
        }
    }

    /// The tree of finished stage `index`, for `FROM`, `COPY --from` and `RUN --mount=from=`:
    /// unpacked from the stage's layers the first time it is needed, if the stage itself never
    /// materialized it.
    pub fn stage_rootfs(&self, index: usize) -> Result<PathBuf, BuildError> {
        let stage = self
            .finished(index)
            .ok_or_else(|| BuildError::Image(format!("stage {index} has not been built")))?;
        let mut ready = stage.ready.lock().expect("stage rootfs");
        if !*ready {
            self.timed(Some(index), None, Phase::Unpack, || {
                std::fs::create_dir_all(&stage.rootfs).map_err(|source| BuildError::Io {
                    path: stage.rootfs.clone(),
                    source,
                })?;
                self.runtime.block_on(crate::output::ensure_local(
                    &self.client,
                    &self.blobs,
                    &stage.layers,
                ))?;
                base::unpack_into(&stage.rootfs, &stage.layers, &self.blobs, &mut Index::new())
            })?;
            *ready = true;
        }
        Ok(stage.rootfs.clone())
    }

    /// The tree of `image` (as written in `COPY --from` or `RUN --mount=from=`), pulled and
    /// unpacked the first time it is needed. With the layer cache on it is the manifest the
    /// step's key was computed from, even if the tag has moved since.
    pub fn image_tree(&self, image: &str) -> Result<ImageTree, BuildError> {
        // Held while pulling, so that two stages needing the same image pull it once.
        let mut images = self.images.lock().expect("image map");
        if let Some(tree) = images.get(image) {
            return Ok(tree.clone());
        }
        let cache_dir = self.options.cache.dir.as_deref();
        let pulled = self.runtime.block_on(async {
            let manifest = match self.remote.image_manifest(image) {
                Some(pinned) => pinned,
                None => base::resolve_manifest(&self.client, image, &self.platform).await?,
            };
            let (client, blobs, events) = (&self.client, &self.blobs, &*self.events);
            base::pull_resolved(client, blobs, manifest, image, events, cache_dir).await
        })?;
        let root = self.work_dir.join(format!("image-{}", images.len()));
        std::fs::create_dir_all(&root).map_err(|source| BuildError::Io {
            path: root.clone(),
            source,
        })?;
        base::unpack_into(&root, &pulled.layers, &self.blobs, &mut Index::new())?;
        let tree = ImageTree {
            root,
            manifest_digest: pulled.manifest_digest,
        };
        images.insert(image.to_owned(), tree.clone());
        Ok(tree)
    }

    /// The tree a `RUN --mount=from=` reads, and what names its content.
    fn mount_source(&self, from: &Source) -> Result<MountSource, String> {
        match from {
            Source::Stage(index) => {
                let root = self
                    .stage_rootfs(*index)
                    .map_err(|e| format!("--mount from stage {index}: {e}"))?;
                let stage = self.finished(*index).ok_or_else(|| {
                    format!("--mount from stage {index}: the stage has not been built")
                })?;
                let diff_ids: Vec<String> =
                    stage.layers.iter().map(|l| l.diff_id.to_string()).collect();
                let identity = kiln_oci::Digest::sha256_of(diff_ids.join("\n").as_bytes());
                Ok(MountSource {
                    root,
                    identity: identity.to_string(),
                })
            }
            Source::Image(image) => {
                let tree = self
                    .image_tree(image)
                    .map_err(|e| format!("--mount from={image}: {e}"))?;
                Ok(MountSource {
                    root: tree.root,
                    identity: tree.manifest_digest.to_string(),
                })
            }
        }
    }

    fn finished(&self, index: usize) -> Option<Arc<StageOutput>> {
        self.stages.lock().expect("stage map").get(&index).cloned()
    }

    fn step_error(&self, line: usize, message: impl Into<String>) -> BuildError {
        BuildError::Step {
            file: self.dockerfile_name.clone(),
            line,
            message: message.into(),
        }
    }

    /// The instruction as written (continuation lines joined), for display and history.
    fn instruction_text(&self, step: &Step) -> String {
        let start = step.lines.start.saturating_sub(1);
        let end = step.lines.end.min(self.dockerfile_lines.len());
        let mut text = String::new();
        for line in self.dockerfile_lines.get(start..end).unwrap_or_default() {
            let trimmed = line.trim();
            let trimmed = trimmed.strip_suffix('\\').unwrap_or(trimmed).trim();
            if trimmed.starts_with('#') || trimmed.is_empty() {
                continue;
            }
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(trimmed);
        }
        text
    }

    fn layer_options(&self) -> LayerOptions {
        let compression = match self.options.output.compression {
            kiln_oci::Compression::None => kiln_fs::compress::Compression::None,
            kiln_oci::Compression::Gzip => kiln_fs::compress::Compression::Gzip {
                level: self
                    .options
                    .output
                    .compression_level
                    .map_or(6, |l| l.clamp(0, 9) as u32),
            },
            kiln_oci::Compression::Zstd => kiln_fs::compress::Compression::Zstd {
                level: self
                    .options
                    .output
                    .compression_level
                    .map_or(3, |l| l.clamp(1, 22)),
            },
        };
        LayerOptions {
            compression,
            source_date_epoch: self.source_date_epoch(),
            ..LayerOptions::default()
        }
    }

    /// `SOURCE_DATE_EPOCH`, or 0 under `--reproducible`, which clamps every new entry's time.
    pub fn source_date_epoch(&self) -> Option<i64> {
        self.options
            .output
            .source_date_epoch
            .or(self.options.output.reproducible.then_some(0))
    }
}

/// Builds stage `index` of the plan.
pub fn build_stage(shared: &Shared, index: usize) -> Result<StageOutput, BuildError> {
    let planned = shared
        .plan
        .stage(index)
        .ok_or_else(|| BuildError::Options(format!("stage {index} is not part of the plan")))?;
    let in_place = shared.mode == Mode::InPlace;
    let in_place_ignore = inplace::ignore_options(&shared.options, shared.context.root());
    let rootfs = if in_place {
        PathBuf::from("/")
    } else {
        shared.work_dir.join(format!("stage-{index}"))
    };
    std::fs::create_dir_all(&rootfs).map_err(|source| BuildError::Io {
        path: rootfs.clone(),
        source,
    })?;
    if in_place {
        // kaniko's model: the stage starts from an empty `/`, keeping only what is ignored.
        inplace::wipe(&rootfs, &inplace::ignore_set(&in_place_ignore)?)?;
    }
    let from_line = planned.lines.start;
    let base_text = match &planned.base {
        Base::Scratch => "scratch".to_owned(),
        Base::Image(image) => image.clone(),
        Base::Stage(i) => format!("stage {i}"),
    };
    shared.emit(BuildEvent::StageStarted {
        stage: index,
        base: base_text,
    });

    let mut index_of_rootfs = Index::new();
    let mut rescan = false;
    let mut pending_base: Option<String> = None;
    let mut pending_stage: Option<usize> = None;
    // The stage record's locator and the record found there, and the base it records.
    let mut stage_record: Option<(kiln_cache::StageLocator, Option<kiln_cache::StageRecord>)> =
        None;
    let mut recorded_base: Option<kiln_cache::RecordedBase> = None;
    let mut cache_parent: Option<kiln_cache::Parent> = match &planned.base {
        Base::Scratch => Some(kiln_cache::Parent::Scratch),
        Base::Stage(i) => shared
            .finished(*i)
            .and_then(|s| s.cache_key.clone())
            .map(kiln_cache::Parent::Key),
        Base::Image(_) => None,
    };
    let (mut config, mut layers, inherited_env, base_image) = match &planned.base {
        Base::Scratch => {
            // BuildKit gives a stage built FROM scratch the default PATH in its config, so the
            // image's own binaries are found by name at run time.
            let mut config = ImageConfig::new(&shared.platform);
            config.config.env = Some(vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ]);
            (config, Vec::new(), Vec::new(), None)
        }
        Base::Image(image) if shared.cache.is_some() => {
            // With the cache, layers are fetched only if a step has to run (see `materialize`),
            // and the stage record is asked for together with the base manifest: it may hold
            // the base config, and the answer to every probe.
            let cache = shared.cache.as_ref().expect("guarded");
            let locator = stage_locator(shared, cache, index, image);
            // The stage's remote inputs are pinned in the same round, as far as the steps can
            // be read before the base's ENV and triggers are known (see `RemotePins`).
            let written_steps = planned.steps(&[]).ok();
            let prefetch = async {
                if let Some(steps) = &written_steps {
                    (shared.remote)
                        .prefetch(&steps.steps, &shared.client, &shared.platform)
                        .await
                }
            };
            let (pulled, record) = shared
                .timed(Some(index), None, Phase::Pull, || {
                    shared.runtime.block_on(async {
                        let (manifest, record, ()) = futures::join!(
                            base::resolve_manifest(&shared.client, image, &shared.platform),
                            cache.lookup_record(&locator),
                            prefetch,
                        );
                        let manifest = manifest?;
                        let known = record.as_ref().and_then(|r: &kiln_cache::StageRecord| {
                            r.base_config(manifest.digest(), manifest.config_digest())
                        });
                        let pulled = manifest.with_config(&shared.client, known).await?;
                        Ok::<_, BuildError>((pulled, record))
                    })
                })
                .map_err(|e| shared.step_error(from_line, format!("FROM {image}: {e}")))?;
            pending_base = Some(image.clone());
            stage_record = Some((locator, record));
            recorded_base = Some(kiln_cache::RecordedBase {
                manifest_digest: pulled.manifest_digest.clone(),
                config: pulled.config_bytes.clone(),
            });
            let env = metadata::env_pairs(&pulled.config.config);
            let base = Some((pulled.reference.to_string(), pulled.manifest_digest.clone()));
            cache_parent = Some(crate::cache::image_parent(&pulled.manifest_digest));
            (pulled.config, pulled.layers, env, base)
        }
        Base::Image(image) => {
            let pulled = shared.pull_base_into(
                index,
                from_line,
                image,
                in_place.then_some(&in_place_ignore),
                &rootfs,
                &mut index_of_rootfs,
            )?;
            shared.push_ahead(index, &pulled.layers);
            let env = metadata::env_pairs(&pulled.config.config);
            let base = Some((pulled.reference.to_string(), pulled.manifest_digest.clone()));
            (pulled.config, pulled.layers, env, base)
        }
        Base::Stage(i) => {
            let parent = shared.finished(*i).ok_or_else(|| {
                shared.step_error(from_line, format!("stage {i} has not been built"))
            })?;
            pending_stage = Some(*i);
            rescan = true;
            (
                parent.config.clone(),
                parent.layers.clone(),
                parent.env.clone(),
                parent.base_image.clone(),
            )
        }
    };
    // In place, what survived the wipe (directories leading to mount points) is not the
    // build's doing: the first snapshot must not report it.
    rescan |= in_place;
    // ONBUILD triggers of an image base run first, as if written right after FROM; a stage
    // built FROM another stage of this Dockerfile does not run that stage's own triggers.
    let triggers = match planned.base {
        Base::Image(_) => config.config.on_build.clone().unwrap_or_default(),
        _ => Vec::new(),
    };
    config.config.on_build = None;
    config.created = None;

    let snapshot_options = SnapshotOptions {
        mode: shared.options.snapshot.mode,
        ignore: if in_place {
            in_place_ignore.clone()
        } else {
            IgnoreOptions {
                var_run: shared.options.snapshot.ignore_var_run,
                extra: shared.options.snapshot.ignore_paths.clone(),
                ..IgnoreOptions::default()
            }
        },
    };
    let steps = planned
        .steps_with_triggers(&inherited_env, &triggers)
        .map_err(|e| BuildError::Dockerfile(e.to_string()))?;
    let mut cmd_inherited = config.config.cmd.is_some();
    let layer_options = shared.layer_options();
    let mut materializer = Materializer {
        shared,
        index,
        rootfs: &rootfs,
        from_line,
        in_place,
        in_place_ignore: &in_place_ignore,
        snapshot_options: &snapshot_options,
        pending_base,
        pending_stage,
        pending_cached: Vec::new(),
        base_index: Some(index_of_rootfs),
        rescan,
    };
    let mut prepared: Option<(Snapshotter, Box<dyn Sandbox>)> = None;
    let mut plan = match &shared.cache {
        Some(cache) => {
            let stage_key = |i: usize| shared.finished(i).and_then(|s| s.cache_key.clone());
            let keys = crate::cache::KeyContext {
                context: &shared.context,
                stage_key: &stage_key,
                remote: &shared.remote,
            };
            let pin = shared
                .remote
                .pin(&steps.steps, &shared.client, &shared.platform);
            // A stage on scratch or on another stage asks for its record here; one on an image
            // already did, with the base manifest.
            let parent_text = match &cache_parent {
                Some(kiln_cache::Parent::Scratch) => Some("scratch".to_owned()),
                Some(kiln_cache::Parent::Key(key)) => Some(key.to_string()),
                _ => None,
            };
            if let (None, Some(parent)) = (&stage_record, parent_text) {
                let locator = stage_locator(shared, cache, index, &parent);
                let (record, ()) = shared
                    .runtime
                    .block_on(async { futures::join!(cache.lookup_record(&locator), pin) });
                stage_record = Some((locator, record));
            } else {
                shared.runtime.block_on(pin);
            }
            let (locator, record) = match stage_record.take() {
                Some((locator, record)) => (Some(locator), record),
                None => (None, None),
            };
            let mut plan = cache.plan_stage(
                &shared.runtime,
                cache_parent.take(),
                &steps.steps,
                &config.config,
                &keys,
                record.as_ref(),
            );
            plan.locator = locator;
            plan
        }
        None => {
            prepared = Some(materializer.materialize()?);
            crate::cache::StagePlan::default()
        }
    };
    // A stage made wholly of cache hits pushes nothing ahead: an identical earlier build put
    // its blobs in place, and the final push tries the manifest alone first (`output::push`).
    let fully_cached = plan.fully_cached(&steps.steps);
    if shared.cache.is_some() && !fully_cached && matches!(planned.base, Base::Image(_)) {
        shared.push_ahead(index, &layers);
    }
    let mut record_slots: Vec<crate::cache::RecordSlot> = Vec::new();

    for (step_no, step) in steps.steps.iter().enumerate() {
        let started = Instant::now();
        let line = step.lines.start;
        let text = shared.instruction_text(step);
        shared.emit(BuildEvent::StepStarted {
            stage: index,
            step: step_no,
            line,
            instruction: text.clone(),
        });
        let history = History {
            created_by: Some(text.clone()),
            comment: Some("kiln".to_owned()),
            ..History::default()
        };
        if let Some(entry) = plan.hits.get_mut(step_no).and_then(Option::take) {
            let cache = shared.cache.as_ref().expect("hits come from the cache");
            if let Instruction::Workdir(dir) = &step.instruction {
                let rel = workdir_target(&config, dir);
                config.config.working_dir = Some(format!("/{}", rel.display()));
            }
            match &entry.layer {
                Some(cached) => {
                    let layer = cache.hit_layer(&shared.runtime, &shared.blobs, cached)?;
                    match prepared.as_mut() {
                        Some((snapshotter, _)) => {
                            materializer.apply_cached(&[(cached.clone(), layer.clone())])?;
                            snapshotter
                                .rescan()
                                .map_err(|e| BuildError::Image(e.to_string()))?;
                        }
                        None => materializer
                            .pending_cached
                            .push((cached.clone(), layer.clone())),
                    }
                    if !fully_cached {
                        shared.push_ahead(index, std::slice::from_ref(&layer));
                    }
                    let history = History {
                        created: entry.history.created.clone(),
                        ..history
                    };
                    config.push_layer(layer.diff_id.clone(), history);
                    layers.push(layer);
                }
                None => config.push_empty_layer_history(history),
            }
            record_slots.push(crate::cache::RecordSlot::Known(Box::new(entry)));
            shared.emit(BuildEvent::StepFinished {
                stage: index,
                step: step_no,
                duration: started.elapsed(),
                cached: true,
            });
            continue;
        }
        if prepared.is_none() && crate::cache::is_layer_step(&step.instruction) {
            prepared = Some(materializer.materialize()?);
        }
        let (snapshotter, sandbox) = match prepared.as_mut() {
            Some((snapshotter, sandbox)) => (Some(snapshotter), Some(&*sandbox)),
            None => (None, None),
        };
        let mut stage = snapshotter.map(|snapshotter| StageRun {
            shared,
            index,
            rootfs: &rootfs,
            snapshotter,
            layer_options: &layer_options,
        });
        let diff = match &step.instruction {
            Instruction::Run(run_command) => {
                let scratch = shared.work_dir.join(format!("scratch-{index}-{step_no}"));
                let mount_source = |from: &Source| shared.mount_source(from);
                let (cache_dirs, cache_locks) = (
                    shared.options.kiln_dir.join("mount-cache"),
                    shared.options.kiln_dir.join("mount-cache-locks"),
                );
                let ctx = RunContext {
                    stage: index,
                    step: step_no,
                    context_root: shared.context.root(),
                    mount_source: &mount_source,
                    scratch: &scratch,
                    cache_mounts: CacheMountStore {
                        dirs: &cache_dirs,
                        locks: &cache_locks,
                    },
                    secrets: &shared.options.secrets,
                    ssh: &shared.options.ssh,
                    hidden: &shared.hidden,
                    emit: &*shared.events,
                };
                let outcome = shared.timed(Some(index), Some(step_no), Phase::Execute, || {
                    let sandbox = sandbox.expect("materialized for RUN");
                    run::run(
                        &**sandbox,
                        &ctx,
                        run_command,
                        &config.config,
                        step.run_env(),
                    )
                });
                let _ = std::fs::remove_dir_all(&scratch);
                let outcome = outcome.map_err(|e| shared.step_error(line, format!("RUN: {e}")))?;
                if !outcome.status.success() {
                    return Err(BuildError::RunFailed {
                        file: shared.dockerfile_name.clone(),
                        line,
                        code: outcome.status.code(),
                    });
                }
                let restored: Vec<PathBuf> = outcome
                    .restored_dirs
                    .iter()
                    .map(|d| copy::clean_relative(d))
                    .collect();
                Some(
                    shared.timed(Some(index), Some(step_no), Phase::Snapshot, || {
                        materialized(&mut stage).snapshot_after_run(&restored, line)
                    })?,
                )
            }
            Instruction::Copy(files) => {
                let written = shared.timed(Some(index), Some(step_no), Phase::Execute, || {
                    materialized(&mut stage).copy(
                        &files.sources,
                        &files.dest,
                        files.from.as_ref(),
                        files.chown.as_deref(),
                        files.chmod.as_ref(),
                        &config,
                        line,
                        &files.exclude,
                        files.parents,
                        false,
                    )
                })?;
                Some(
                    shared.timed(Some(index), Some(step_no), Phase::Snapshot, || {
                        materialized(&mut stage).snapshot_paths(&written, line)
                    })?,
                )
            }
            Instruction::Add(files) => {
                let (written, as_keyed) =
                    shared.timed(Some(index), Some(step_no), Phase::Execute, || {
                        materialized(&mut stage).add(files, &config, line, step_no)
                    })?;
                if !as_keyed && plan.keys.get(step_no).is_some_and(Option::is_some) {
                    // The key names content this download is not.
                    plan.unkey_from(step_no);
                    shared.emit(BuildEvent::Warning {
                        message: format!(
                            "{}:{line}: ADD: the server's validators changed between keying and downloading; this step and the rest of the stage are not cached",
                            shared.dockerfile_name
                        ),
                    });
                }
                Some(
                    shared.timed(Some(index), Some(step_no), Phase::Snapshot, || {
                        materialized(&mut stage).snapshot_paths(&written, line)
                    })?,
                )
            }
            Instruction::Workdir(dir) => {
                let current = config
                    .config
                    .working_dir
                    .clone()
                    .unwrap_or_else(|| "/".into());
                let absolute = Path::new("/").join(&current).join(dir);
                let rel = copy::clean_relative(&absolute);
                config.config.working_dir = Some(format!("/{}", rel.display()));
                let exists = Root::open(&rootfs)
                    .and_then(|root| root.metadata(&rel))
                    .is_ok_and(|meta| meta.is_dir());
                if rel.as_os_str().is_empty() || exists {
                    None
                } else {
                    let user = config.config.user.clone().unwrap_or_default();
                    let (uid, gid) = resolve_ids(&rootfs, &user, false)
                        .map_err(|e| shared.step_error(line, format!("WORKDIR: {e}")))?;
                    let created = copy::make_dirs(&rootfs, &rel, uid, gid)
                        .map_err(|e| shared.step_error(line, format!("WORKDIR: {e}")))?;
                    Some(materialized(&mut stage).snapshot_paths(&created, line)?)
                }
            }
            Instruction::Maintainer(name) => {
                config.author = Some(name.clone());
                None
            }
            Instruction::Arg(_) => None,
            other => {
                metadata::apply(&mut config.config, other, &mut cmd_inherited);
                None
            }
        };
        match diff {
            Some(diff) if !diff.is_empty() => {
                let layer = shared.timed(Some(index), Some(step_no), Phase::Layer, || {
                    materialized(&mut stage).write_layer(&diff, step_no, line)
                })?;
                // A layer's history carries the time it was made, and the cache entry keeps
                // it, so a rebuild from the cache dates the layer as the first build did (and
                // `output::assemble` derives every other time from these, as BuildKit does).
                let history = History {
                    created: Some(crate::output::now_rfc3339()),
                    ..history
                };
                shared.push_ahead(index, std::slice::from_ref(&layer));
                if let (Some(cache), Some(Some(key))) = (&shared.cache, plan.keys.get(step_no)) {
                    let path = shared.blobs.blob_path(&layer.descriptor.digest);
                    record_slots.extend(cache.store_in_background(
                        &shared.runtime,
                        key.clone(),
                        &step.instruction,
                        Some((&layer, &path)),
                        shared.push_ahead.as_ref(),
                        &config.config,
                        &history,
                    ));
                }
                config.push_layer(layer.diff_id.clone(), history);
                layers.push(layer);
            }
            _ if matches!(step.instruction, Instruction::Arg(_)) => {}
            _ => {
                if let (Some(cache), Some(Some(key))) = (&shared.cache, plan.keys.get(step_no)) {
                    record_slots.extend(cache.store_in_background(
                        &shared.runtime,
                        key.clone(),
                        &step.instruction,
                        None,
                        None,
                        &config.config,
                        &history,
                    ));
                }
                config.push_empty_layer_history(history)
            }
        }
        shared.emit(BuildEvent::StepFinished {
            stage: index,
            step: step_no,
            duration: started.elapsed(),
            cached: false,
        });
    }
    // --materialize (kaniko's flag): in place, `/` ends as the target's filesystem even when
    // every step was a hit.
    if in_place && index == shared.plan.target() && shared.options.materialize && prepared.is_none()
    {
        prepared = Some(materializer.materialize()?);
    }
    // A stage that never needed its tree leaves it to be unpacked from its layers when a later
    // stage reads it (`FROM`, `COPY --from`, `RUN --mount=from=`), if one does. In place, the
    // next stage wipes `/`: a non-target stage's tree is rebuilt from its layers the same way.
    let (rootfs, ready) = if in_place && index != shared.plan.target() {
        (shared.work_dir.join(format!("stage-{index}")), false)
    } else {
        (rootfs, prepared.is_some())
    };
    drop(prepared);
    if let (Some(cache), Some(locator)) = (&shared.cache, plan.locator.take()) {
        // Every step keyed and the record short of something: record what this build knows.
        if plan.final_key.is_some() && !plan.answered_by_record {
            cache.record_in_background(&shared.runtime, locator, recorded_base, record_slots);
        }
    }
    Ok(StageOutput {
        rootfs,
        ready: Mutex::new(ready),
        config,
        layers,
        env: steps.env,
        base_image,
        cache_key: plan.final_key,
        fully_cached,
    })
}

/// The locator of stage `index`'s record; `base` is what it is built on (the image as written,
/// `scratch`, or the final key of its base stage).
fn stage_locator(
    shared: &Shared,
    cache: &crate::cache::EngineCache,
    index: usize,
    base: &str,
) -> kiln_cache::StageLocator {
    cache.stage_locator(
        &shared.dockerfile_lines.join("\n"),
        index,
        base,
        &shared.options.build_args,
    )
}

/// The StageRun of a step that needs the rootfs, which the loop has materialized.
fn materialized<'s, 'a>(stage: &'s mut Option<StageRun<'a>>) -> &'s mut StageRun<'a> {
    stage
        .as_mut()
        .expect("the rootfs is materialized before a layer step")
}

/// Where `WORKDIR dir` leads from the current working directory, relative to the root.
fn workdir_target(config: &ImageConfig, dir: &str) -> PathBuf {
    let current = config
        .config
        .working_dir
        .clone()
        .unwrap_or_else(|| "/".into());
    copy::clean_relative(&Path::new("/").join(&current).join(dir))
}

/// Brings a stage's rootfs into being only when a step has to run: with the cache, a stage
/// whose steps are all hits never pulls or unpacks anything.
struct Materializer<'a> {
    shared: &'a Shared,
    index: usize,
    rootfs: &'a Path,
    from_line: usize,
    in_place: bool,
    in_place_ignore: &'a IgnoreOptions,
    snapshot_options: &'a SnapshotOptions,
    /// A base image whose layers are not unpacked yet.
    pending_base: Option<String>,
    /// A base stage whose tree is not copied yet.
    pending_stage: Option<usize>,
    /// Cache hits taken before the rootfs existed, to apply on top of the base.
    pending_cached: Vec<(kiln_cache::CachedLayer, ImageLayer)>,
    base_index: Option<Index>,
    rescan: bool,
}

impl Materializer<'_> {
    /// Unpacks what is pending and prepares the snapshotter and the RUN sandbox.
    fn materialize(&mut self) -> Result<(Snapshotter, Box<dyn Sandbox>), BuildError> {
        let shared = self.shared;
        let mut index_of_rootfs = self.base_index.take().unwrap_or_default();
        if let Some(image) = self.pending_base.take() {
            shared.pull_base_into(
                self.index,
                self.from_line,
                &image,
                self.in_place.then_some(self.in_place_ignore),
                self.rootfs,
                &mut index_of_rootfs,
            )?;
        }
        if let Some(parent) = self.pending_stage.take() {
            let from_line = self.from_line;
            let stage_error =
                |e: BuildError| shared.step_error(from_line, format!("FROM stage {parent}: {e}"));
            let parent_output = shared
                .finished(parent)
                .ok_or_else(|| BuildError::Image(format!("stage {parent} has not been built")))
                .map_err(stage_error)?;
            if self.in_place {
                // `/` was the parent's until the wipe: its layers rebuild it.
                shared.runtime.block_on(crate::output::ensure_local(
                    &shared.client,
                    &shared.blobs,
                    &parent_output.layers,
                ))?;
                shared
                    .timed(Some(self.index), None, Phase::Unpack, || {
                        let ignore = inplace::ignore_set(self.in_place_ignore)?;
                        inplace::unpack_into_root(&parent_output.layers, &shared.blobs, &ignore)
                    })
                    .map_err(stage_error)?;
            } else {
                let tree = shared.stage_rootfs(parent).map_err(stage_error)?;
                shared.timed(Some(self.index), None, Phase::Unpack, || {
                    copy_tree_contents(&tree, self.rootfs)
                })?;
            }
        }
        let cached = std::mem::take(&mut self.pending_cached);
        if !cached.is_empty() {
            self.apply_cached(&cached)?;
            self.rescan = true;
        }
        let mut snapshotter = Snapshotter::new(self.rootfs, index_of_rootfs, self.snapshot_options)
            .map_err(|e| BuildError::Image(e.to_string()))?;
        if self.rescan {
            snapshotter
                .rescan()
                .map_err(|e| BuildError::Image(e.to_string()))?;
        }
        let sandbox: Box<dyn Sandbox> =
            kiln_sandbox::open(shared.mode, self.rootfs).map_err(|e| {
                shared.step_error(
                    self.from_line,
                    format!("cannot prepare the RUN sandbox: {e}"),
                )
            })?;
        Ok((snapshotter, sandbox))
    }

    /// Fetches cached layers into the blob store and unpacks them onto the rootfs.
    fn apply_cached(
        &self,
        cached: &[(kiln_cache::CachedLayer, ImageLayer)],
    ) -> Result<(), BuildError> {
        let shared = self.shared;
        let cache = shared
            .cache
            .as_ref()
            .expect("cached layers come from the cache");
        for (entry, _) in cached {
            cache.fetch_blob(&shared.runtime, &shared.blobs, entry)?;
        }
        let layers: Vec<ImageLayer> = cached.iter().map(|(_, layer)| layer.clone()).collect();
        shared.timed(Some(self.index), None, Phase::Unpack, || {
            if self.in_place {
                let ignore = inplace::ignore_set(self.in_place_ignore)?;
                inplace::unpack_into_root(&layers, &shared.blobs, &ignore)
            } else {
                base::unpack_into(self.rootfs, &layers, &shared.blobs, &mut Index::new())
            }
        })
    }
}

/// `--chown` / USER resolution: `user[:group]` by name or id against the rootfs's passwd and
/// group files. For `--chown`, a missing group means "same number as the uid" (Docker's rule);
/// for USER (WORKDIR ownership), the user's primary group.
fn resolve_ids(rootfs: &Path, spec: &str, chown_rule: bool) -> Result<(u32, u32), String> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let resolved = kiln_sandbox::resolve_user(rootfs, user).map_err(|e| e.to_string())?;
    let gid = match group {
        Some(g) if !g.is_empty() => {
            kiln_sandbox::resolve_user(rootfs, &format!("0:{g}"))
                .map_err(|e| e.to_string())?
                .gid
        }
        _ if chown_rule => resolved.uid,
        _ => resolved.gid,
    };
    Ok((resolved.uid, gid))
}

fn copy_tree_contents(from: &Path, to: &Path) -> Result<(), BuildError> {
    kiln_fs::clone::clone_tree(from, to).map_err(|e| BuildError::Io {
        path: e.path,
        source: e.source,
    })
}

fn workdir_of(config: &ImageConfig) -> String {
    config
        .config
        .working_dir
        .clone()
        .unwrap_or_else(|| "/".into())
}

struct StageRun<'a> {
    shared: &'a Shared,
    index: usize,
    rootfs: &'a Path,
    snapshotter: &'a mut Snapshotter,
    layer_options: &'a LayerOptions,
}

impl StageRun<'_> {
    fn snapshot_after_run(
        &mut self,
        restored: &[PathBuf],
        line: usize,
    ) -> Result<Diff, BuildError> {
        let before: Vec<_> = restored
            .iter()
            .filter_map(|p| {
                self.snapshotter
                    .index()
                    .get(p)
                    .cloned()
                    .map(|e| (p.clone(), e))
            })
            .collect();
        let mut diff = self
            .snapshotter
            .snapshot()
            .map_err(|e| self.shared.step_error(line, format!("snapshot: {e}")))?;
        // The sandbox created and removed mount targets in these directories and restored their
        // times: only their ctime moved, which is no change an image can show.
        diff.changes.retain(|change| {
            change.kind != ChangeKind::Modified
                || !before.iter().any(|(path, old)| {
                    *path == change.path
                        && change
                            .entry
                            .as_ref()
                            .is_some_and(|new| new.same_visible_stat(old))
                })
        });
        Ok(diff)
    }

    fn snapshot_paths(&mut self, written: &[PathBuf], line: usize) -> Result<Diff, BuildError> {
        self.snapshotter
            .snapshot_paths(written)
            .map_err(|e| self.shared.step_error(line, format!("snapshot: {e}")))
    }

    fn write_layer(
        &mut self,
        diff: &Diff,
        step: usize,
        line: usize,
    ) -> Result<ImageLayer, BuildError> {
        let blob = write_layer(self.rootfs, diff, &self.shared.blobs, self.layer_options)
            .map_err(|e| self.shared.step_error(line, format!("writing layer: {e}")))?;
        self.shared.emit(BuildEvent::LayerCreated {
            stage: self.index,
            step,
            digest: blob.digest.clone(),
            diff_id: blob.diff_id.clone(),
            size: blob.size,
        });
        Ok(ImageLayer {
            descriptor: Descriptor::new(MediaType::parse(blob.media_type), blob.digest, blob.size),
            diff_id: blob.diff_id,
            origin: None,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
        &mut self,
        sources: &[FileSource],
        dest: &str,
        from: Option<&Source>,
        chown: Option<&str>,
        chmod: Option<&kiln_dockerfile::Chmod>,
        config: &ImageConfig,
        line: usize,
        exclude: &[String],
        parents: bool,
        unpack: bool,
    ) -> Result<Vec<PathBuf>, BuildError> {
        let shared = self.shared;
        let owner = self.chown_ids(chown, line)?;
        let workdir = workdir_of(config);
        let excluded =
            kiln_context::DockerIgnore::parse(&exclude.join("\n"), Path::new("--exclude"))
                .map_err(|e| shared.step_error(line, e.to_string()))?;
        let exclude = |rel: &Path| excluded.is_excluded(&rel.to_string_lossy());
        let request = CopyRequest {
            sources,
            dest,
            workdir: &workdir,
            owner,
            chmod,
            exclude: &exclude,
            parents,
            unpack,
        };
        let result = match from {
            None => {
                let tree = SourceTree {
                    view: shared.context.view(),
                    keep_owner: false,
                };
                copy::copy(self.rootfs, &tree, &request)
            }
            Some(Source::Stage(i)) => {
                let stage_root = shared
                    .stage_rootfs(*i)
                    .map_err(|e| shared.step_error(line, format!("COPY --from: {e}")))?;
                let root = Root::open(&stage_root)
                    .map_err(|e| shared.step_error(line, format!("COPY --from: {e}")))?;
                let description = format!("stage {i}");
                let tree = SourceTree {
                    view: TreeView::new(&root, None, &description),
                    keep_owner: true,
                };
                copy::copy(self.rootfs, &tree, &request)
            }
            Some(Source::Image(image)) => {
                let image_tree = shared
                    .image_tree(image)
                    .map_err(|e| shared.step_error(line, format!("COPY --from={image}: {e}")))?;
                let root = Root::open(&image_tree.root)
                    .map_err(|e| shared.step_error(line, format!("COPY --from={image}: {e}")))?;
                let tree = SourceTree {
                    view: TreeView::new(&root, None, image),
                    keep_owner: true,
                };
                copy::copy(self.rootfs, &tree, &request)
            }
        };
        let instruction = if unpack { "ADD" } else { "COPY" };
        result.map_err(|e| shared.step_error(line, format!("{instruction} failed: {e}")))
    }

    fn chown_ids(
        &self,
        chown: Option<&str>,
        line: usize,
    ) -> Result<Option<(u32, u32)>, BuildError> {
        chown
            .map(|spec| {
                resolve_ids(self.rootfs, spec, true)
                    .map_err(|e| self.shared.step_error(line, format!("--chown={spec}: {e}")))
            })
            .transpose()
    }

    /// ADD: local sources as COPY does, with archives extracted; HTTP(S) URLs downloaded (and
    /// checked against `--checksum`) before anything is written, then copied as files. A URL
    /// the cache pinned by content is not fetched again. Returns the written paths and whether
    /// every download came with the validators its URL was keyed by.
    fn add(
        &mut self,
        files: &kiln_dockerfile::AddFiles,
        config: &ImageConfig,
        line: usize,
        step: usize,
    ) -> Result<(Vec<PathBuf>, bool), BuildError> {
        let shared = self.shared;
        let mut local = Vec::new();
        let mut urls = Vec::new();
        let mut repositories = Vec::new();
        for source in &files.sources {
            match source {
                FileSource::Path(p) if crate::fetch::is_git_source(p) => {
                    repositories.push(p.as_str())
                }
                FileSource::Path(p) if crate::fetch::is_http_url(p) => urls.push(p.as_str()),
                FileSource::Path(p) if p.contains("://") => {
                    return Err(shared.step_error(
                        line,
                        format!("ADD {p}: only http:// and https:// URLs can be fetched"),
                    ))
                }
                other => local.push(other.clone()),
            }
        }
        if files.checksum.is_some()
            && (urls.is_empty() || !local.is_empty() || !repositories.is_empty())
        {
            return Err(
                shared.step_error(line, "ADD --checksum is only supported for HTTP(S) sources")
            );
        }
        if files.sources.len() > 1
            && !(urls.is_empty() && repositories.is_empty())
            && !files.dest.ends_with('/')
        {
            return Err(shared.step_error(
                line,
                format!("when using ADD with more than one source file, the destination must be a directory and end with a /: {}", files.dest),
            ));
        }
        // Every download completes (and passes its checksum) before the rootfs is touched.
        let mut downloads: Vec<Fetched> = Vec::new();
        let mut as_keyed = true;
        for (i, url) in urls.iter().enumerate() {
            let pin = files
                .checksum
                .is_none()
                .then(|| shared.remote.url(url))
                .flatten();
            if let Some(UrlPin::Downloaded(pinned)) = &pin {
                downloads.push(Fetched::kept(&pinned.path));
                continue;
            }
            let dir = shared
                .work_dir
                .join(format!("add-{}-{step}-{i}", self.index));
            std::fs::create_dir_all(&dir).map_err(|source| BuildError::Io {
                path: dir.clone(),
                source,
            })?;
            let fetched = shared.runtime.block_on(crate::fetch::download(
                url,
                files.checksum.as_deref(),
                &dir,
            ));
            match fetched {
                Ok(downloaded) => {
                    if let Some(UrlPin::Validators(keyed)) = &pin {
                        as_keyed &= downloaded.validators == *keyed;
                    }
                    downloads.push(Fetched {
                        remove_after: true,
                        ..Fetched::kept(&downloaded.path)
                    });
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    downloads.iter().for_each(Fetched::remove);
                    return Err(shared.step_error(line, format!("ADD failed: {e}")));
                }
            }
        }
        // Repositories are checked out, at the commit the step was keyed by, before the rootfs
        // is touched too; each checkout goes when the step is done.
        let mut checkouts: Vec<(tempfile::TempDir, PathBuf)> = Vec::new();
        for source in &repositories {
            let checked_out = tempfile::Builder::new()
                .prefix("add-git-")
                .tempdir_in(&shared.work_dir)
                .map_err(|e| e.to_string())
                .and_then(|dir| {
                    let subdir =
                        check_out(shared, source, dir.path()).map_err(|e| e.to_string())?;
                    Ok((dir, subdir))
                });
            match checked_out {
                Ok(checkout) => checkouts.push(checkout),
                Err(e) => {
                    downloads.iter().for_each(Fetched::remove);
                    return Err(shared.step_error(line, format!("ADD failed: {e}")));
                }
            }
        }
        let mut written = Vec::new();
        let result = (|| {
            if !local.is_empty() {
                written.extend(self.copy(
                    &local,
                    &files.dest,
                    None,
                    files.chown.as_deref(),
                    files.chmod.as_ref(),
                    config,
                    line,
                    &files.exclude,
                    false,
                    true,
                )?);
            }
            let owner = self.chown_ids(files.chown.as_deref(), line)?;
            let workdir = workdir_of(config);
            // Downloads and checkouts are copied as context files are: owned by root or
            // --chown, with --chmod.
            let mut copy_fetched =
                |dir: &Path, source: String, ignore: Option<&kiln_context::DockerIgnore>| {
                    let sources = [FileSource::Path(source)];
                    let root = Root::open(dir)
                        .map_err(|e| shared.step_error(line, format!("ADD failed: {e}")))?;
                    let description = dir.display().to_string();
                    let tree = SourceTree {
                        view: TreeView::new(&root, ignore, &description),
                        keep_owner: false,
                    };
                    let request = CopyRequest {
                        sources: &sources,
                        dest: &files.dest,
                        workdir: &workdir,
                        owner,
                        chmod: files.chmod.as_ref(),
                        exclude: &copy::exclude_nothing,
                        parents: false,
                        unpack: false,
                    };
                    written.extend(
                        copy::copy(self.rootfs, &tree, &request)
                            .map_err(|e| shared.step_error(line, format!("ADD failed: {e}")))?,
                    );
                    Ok::<(), BuildError>(())
                };
            for Fetched { dir, name, .. } in &downloads {
                copy_fetched(dir, name.clone(), None)?;
            }
            // The repository's `.git` stays out unless --keep-git-dir (BuildKit).
            let git_dir = kiln_context::DockerIgnore::parse(".git", Path::new("--keep-git-dir"))
                .map_err(|e| shared.step_error(line, e.to_string()))?;
            let git_dir = (!files.keep_git_dir).then_some(&git_dir);
            for (root, subdir) in &checkouts {
                copy_fetched(root.path(), subdir.display().to_string(), git_dir)?;
            }
            Ok(())
        })();
        downloads.iter().for_each(Fetched::remove);
        result.map(|()| (written, as_keyed))
    }
}

/// Checks out the git repository `source` names, at the commit the step was keyed by (or the
/// one its ref names now, without the cache), into `dir`; returns the directory of it to copy.
fn check_out(
    shared: &Shared,
    source: &str,
    dir: &Path,
) -> Result<PathBuf, kiln_context::ContextError> {
    let repo = kiln_context::GitRepository::parse(source)?;
    let commit = match shared.remote.git(source) {
        Some(pinned) => pinned,
        None => repo.resolve()?,
    };
    repo.checkout(&commit, dir)?;
    Ok(repo.subdir().to_path_buf())
}

/// A file an ADD downloaded, ready to copy from: the directory it is in and its name.
struct Fetched {
    dir: PathBuf,
    name: String,
    /// Whether the directory was made for this step and goes when the step is done; a
    /// download the cache made while keying stays, for any later step with the same URL.
    remove_after: bool,
}

impl Fetched {
    /// A download at `file` that this step leaves in place.
    fn kept(file: &Path) -> Fetched {
        Fetched {
            dir: file.parent().unwrap_or(Path::new("/")).to_path_buf(),
            name: file
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            remove_after: false,
        }
    }

    fn remove(&self) {
        if self.remove_after {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

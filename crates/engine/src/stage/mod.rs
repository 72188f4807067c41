//! Runs one stage of the plan: resolves its base, has the front end write its steps for that
//! base, keys them (with the layer cache), and runs each step — or takes it from the cache —
//! turning each step's changes into a layer in the blob store. Blocking code: it runs on a
//! blocking thread and reaches the registry through the runtime handle.

pub(crate) mod overlay;
pub(crate) mod prepare;
mod record;
mod run_step;
pub(crate) mod trees;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use kiln_fs::snapshot::{IgnoreOptions, Index, SnapshotOptions, Snapshotter};
use kiln_oci::image::{History, ImageConfig};
use kiln_plan::{Base, Provenance, Step};
use kiln_sandbox::{Mode, Sandbox};

use crate::base::ImageLayer;
use crate::cache::{RecordSlot, StagePlan};
use crate::error::{BuildError, Cause};
use crate::events::BuildEvent;
use crate::inplace;
use crate::ops;
use crate::shared::Shared;

use self::prepare::{Materializer, Start};

/// A finished stage: what later stages (`FROM stage`, copies and mounts from it) and the image
/// need.
#[derive(Debug)]
pub(crate) struct StageOutput {
    /// The stage's rootfs directory; read it through [`Shared::stage_rootfs`], which fills it
    /// from the layers when the stage never needed it itself.
    pub(crate) rootfs: PathBuf,
    /// Whether `rootfs` holds the stage's tree. A stage whose steps were all cache hits (or one
    /// built in place, whose `/` the next stage wipes) leaves it empty until someone asks.
    pub(crate) ready: Mutex<bool>,
    /// Its image config (history and diff IDs included).
    pub(crate) config: ImageConfig,
    /// Its layers, bottom first.
    pub(crate) layers: Vec<ImageLayer>,
    /// The base image, when the stage (or the stage it starts from) came from one.
    pub(crate) base_image: Option<(String, kiln_oci::Digest)>,
    /// The cache key after the stage's last step, when the layer cache is on and every step
    /// could be keyed.
    pub(crate) cache_key: Option<kiln_cache::CacheKey>,
    /// Whether every layer step was a cache hit (nothing ran, nothing was pushed ahead).
    pub(crate) fully_cached: bool,
}

/// What a step's execution needs: the build, where the step is, and the config in force.
pub(crate) struct StepContext<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) stage: usize,
    pub(crate) step: usize,
    pub(crate) rootfs: &'a Path,
    pub(crate) image: &'a ImageConfig,
    pub(crate) at: &'a Provenance,
}

impl StepContext<'_> {
    /// A failure of this step caused by `source`.
    pub(crate) fn fail(&self, source: impl Into<Cause>) -> BuildError {
        BuildError::step(self.at.location(), source)
    }

    /// The working directory in force.
    pub(crate) fn working_dir(&self) -> String {
        self.image
            .config
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    }

    /// `--chown`, resolved to ids in the stage's passwd and group files.
    pub(crate) fn chown_ids(&self, chown: Option<&str>) -> Result<Option<(u32, u32)>, BuildError> {
        chown
            .map(|spec| {
                resolve_ids(self.rootfs, spec, true)
                    .map_err(|e| self.fail(format!("--chown={spec}: {e}")))
            })
            .transpose()
    }
}

/// `--chown` / USER resolution: `user[:group]` by name or id against the rootfs's passwd and
/// group files, as they are at this step. Without a group, a user named by name gets the primary
/// group of its passwd entry (BuildKit reads both ids from it); for `--chown` a user given as a
/// number gets that number as its gid too (BuildKit's rule for ids, which it does not look up),
/// while for USER (WORKDIR ownership) it gets the primary group of the passwd entry of that uid.
pub(crate) fn resolve_ids(
    rootfs: &Path,
    spec: &str,
    chown_rule: bool,
) -> Result<(u32, u32), String> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let resolved = kiln_sandbox::resolve_user(rootfs, user).map_err(|e| e.to_string())?;
    let numeric_user = !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit());
    let gid = match group {
        Some(g) if !g.is_empty() => {
            kiln_sandbox::resolve_user(rootfs, &format!("0:{g}"))
                .map_err(|e| e.to_string())?
                .gid
        }
        _ if chown_rule && numeric_user => resolved.uid,
        _ => resolved.gid,
    };
    Ok((resolved.uid, gid))
}

/// What a chroot-mode snapshot leaves out: only the `--ignore-path`s. The stage's rootfs is a
/// directory of its own, not the host's `/`: its `/proc`, `/sys` and `/dev` are the sandbox's
/// mounts only inside a running step's own mount namespace (so what a step writes there never
/// shows here, while a COPY there is the image's, as with BuildKit), and `/var/run`, `/kiln` and
/// `/kaniko` hold the image's files, not the Pod's or Kiln's (`--ignore-var-run` is about the
/// Pod's `/`, in-place mode).
fn chroot_ignore_options(options: &crate::options::BuildOptions) -> IgnoreOptions {
    IgnoreOptions {
        system_paths: false,
        var_run: false,
        mount_points: false,
        extra: options.snapshot.ignore_paths.clone(),
    }
}

/// Builds stage `index` of the plan.
pub(crate) fn build_stage(shared: &Shared, index: usize) -> Result<StageOutput, BuildError> {
    let stage = shared
        .plan
        .stage(index)
        .ok_or_else(|| BuildError::Options(format!("stage {index} is not part of the plan")))?;
    let in_place = shared.mode == Mode::InPlace;
    let in_place_ignore = inplace::ignore_options(&shared.options, shared.context.root());
    let rootfs = prepare::rootfs_of(shared, index, in_place);
    std::fs::create_dir_all(&rootfs).map_err(BuildError::io(&rootfs))?;
    if in_place {
        // kaniko's model: the stage starts from an empty `/`, keeping only what is ignored.
        inplace::wipe(&rootfs, &inplace::ignore_set(&in_place_ignore)?)?;
    }
    shared.emit(BuildEvent::StageStarted {
        stage: index,
        base: prepare::base_text(&stage.base),
    });
    let snapshot_options = SnapshotOptions {
        mode: shared.options.snapshot.mode,
        ignore: if in_place {
            in_place_ignore.clone()
        } else {
            chroot_ignore_options(&shared.options)
        },
    };
    let mut materializer = Materializer {
        shared,
        index,
        rootfs: &rootfs,
        at: stage.origin.location(),
        in_place,
        in_place_ignore: &in_place_ignore,
        snapshot_options: &snapshot_options,
        pending_base: None,
        pending_stage: None,
        pending_cached: Vec::new(),
        base_index: Some(Index::new()),
        // In place, what survived the wipe (directories leading to mount points) is not the
        // build's doing: the first snapshot must not report it.
        rescan: in_place,
        mounted: None,
    };
    let start = record::start(shared, stage, &mut materializer)?;
    let steps = stage
        .steps
        .lower(&start.facts(), &trees::FinishedStages(shared))
        .map_err(|e| BuildError::Plan(e.to_string()))?;
    for message in stage.steps.notes() {
        shared.emit(BuildEvent::Note { message });
    }
    let mut run = StageRun::new(shared, stage, &rootfs, start, materializer);
    run.plan_cache(stage, &steps)?;
    for (step_no, step) in steps.iter().enumerate() {
        shared.cancel.check()?;
        run.step(step_no, step)?;
    }
    run.finish_config(stage)?;
    run.finish(&steps)
}

/// The state of one stage while its steps run.
struct StageRun<'a> {
    shared: &'a Shared,
    index: usize,
    rootfs: &'a Path,
    image: ImageConfig,
    layers: Vec<ImageLayer>,
    base_image: Option<(String, kiln_oci::Digest)>,
    edits: ops::config::EditState,
    materializer: Materializer<'a>,
    /// The snapshotter and sandbox, once the rootfs exists.
    prepared: Option<(Snapshotter, Box<dyn Sandbox>)>,
    cache_parent: Option<kiln_cache::Parent>,
    record: Option<(kiln_cache::StageLocator, Option<kiln_cache::StageRecord>)>,
    recorded_base: Option<kiln_cache::RecordedBase>,
    plan: StagePlan,
    record_slots: Vec<RecordSlot>,
    fully_cached: bool,
    layer_options: kiln_fs::layer::LayerOptions,
    /// `--single-snapshot`: one layer for the whole stage, made after its last step.
    single_snapshot: bool,
    /// `--force-build-metadata`: a step that changed no file still makes a (empty) layer.
    every_step_layered: bool,
    /// How many steps the stage has.
    step_count: usize,
    /// How many of `layers` are the base's.
    base_layers: usize,
    /// The diff ID of each step's layer so far.
    step_layers: Vec<Option<String>>,
    /// Indexes in `layers` of the layers whose files are not in the rootfs (a linked copy
    /// that reuses an image's layer), left out when the stage moves to disk.
    outside_rootfs: Vec<usize>,
}

impl<'a> StageRun<'a> {
    fn new(
        shared: &'a Shared,
        stage: &kiln_plan::Stage,
        rootfs: &'a Path,
        mut start: Start,
        materializer: Materializer<'a>,
    ) -> StageRun<'a> {
        let index = stage.id;
        let mut layer_options = shared.layer_options();
        if !shared.layers_leave_the_build(index) {
            // Nobody downloads these layers: compressing them would cost time (half a second
            // for a 50 MB build stage) and save nothing.
            layer_options.compression = kiln_fs::compress::Compression::None;
        }
        if let Some(epoch) = stage.layer_epoch {
            layer_options.source_date_epoch = Some(epoch);
        }
        let base_layers = start.layers.len();
        // The base's triggers have been written into the steps; the stage's own config keeps
        // none of them, and gets its creation time when it is assembled.
        start.image.config.on_build = None;
        start.image.created = None;
        let edits = ops::config::EditState::new(&start.image.config);
        StageRun {
            shared,
            index,
            rootfs,
            image: start.image,
            layers: start.layers,
            base_image: start.base_image,
            edits,
            materializer,
            prepared: None,
            cache_parent: start.cache_parent,
            record: start.record,
            recorded_base: start.recorded_base,
            plan: StagePlan::default(),
            record_slots: Vec::new(),
            fully_cached: false,
            layer_options,
            single_snapshot: shared.options.snapshot.single_snapshot,
            every_step_layered: shared.options.snapshot.force_build_metadata,
            step_count: 0,
            base_layers,
            step_layers: Vec::new(),
            outside_rootfs: Vec::new(),
        }
    }

    /// The config edits the front end makes once the stage's layers are known.
    fn finish_config(&mut self, stage: &kiln_plan::Stage) -> Result<(), BuildError> {
        let layers = kiln_plan::StageLayers {
            base: self.layers[..self.base_layers]
                .iter()
                .map(|l| l.diff_id.to_string())
                .collect(),
            base_image: self.base_image.as_ref().map(|(name, digest)| {
                format!("{}@{digest}", name.split('@').next().unwrap_or(name))
            }),
            steps: std::mem::take(&mut self.step_layers),
        };
        let edits = stage
            .steps
            .finish(&layers)
            .map_err(|e| BuildError::Plan(e.to_string()))?;
        for edit in &edits {
            ops::config::edit(&mut self.image, edit, &mut self.edits);
        }
        Ok(())
    }

    /// Keys the steps and probes the cache for them all at once (the stage record answers
    /// what it can); without the cache, prepares the rootfs right away.
    fn plan_cache(&mut self, stage: &kiln_plan::Stage, steps: &[Step]) -> Result<(), BuildError> {
        let shared = self.shared;
        self.step_count = steps.len();
        // One layer for the whole stage has no step to key it by: such a stage runs uncached
        // (the builder says so once).
        let cache = shared.cache.as_ref().filter(|_| !self.single_snapshot);
        let Some(cache) = cache else {
            self.prepared = Some(self.materializer.materialize()?);
            return Ok(());
        };
        let (locator, record) = record::lookup(
            shared,
            cache,
            stage,
            steps,
            self.record.take(),
            self.cache_parent.as_ref(),
        );
        let hasher = kiln_context::ContextHasher::new();
        let stage_key = |i: usize| shared.finished(i).and_then(|s| s.cache_key.clone());
        let inputs = ops::KeyInputs {
            context: &shared.context,
            stage_key: &stage_key,
            remote: &shared.remote,
            hasher: &hasher,
        };
        let mut plan = cache.plan_stage(
            &shared.runtime,
            self.cache_parent.take(),
            steps,
            &self.image,
            &inputs,
            record.as_ref(),
        );
        plan.locator = locator;
        self.plan = plan;
        // A stage made wholly of cache hits pushes nothing ahead: an identical earlier build
        // put its blobs in place, and the final push tries the manifest alone first.
        self.fully_cached = self.plan.fully_cached(steps);
        if !self.fully_cached && matches!(stage.base, Base::Image(_)) {
            shared.push_ahead(self.index, &self.layers);
        }
        Ok(())
    }

    /// Runs (or takes from the cache) step `step_no`.
    fn step(&mut self, step_no: usize, step: &Step) -> Result<(), BuildError> {
        let started = Instant::now();
        self.shared.emit(BuildEvent::StepStarted {
            stage: self.index,
            step: step_no,
            line: step.provenance.line,
            instruction: step.provenance.text.clone(),
        });
        let history = History {
            created_by: Some(step.provenance.text.clone()),
            comment: Some("kiln".to_owned()),
            ..History::default()
        };
        let hit = self.plan.hits.get_mut(step_no).and_then(Option::take);
        let cached = hit.is_some();
        match hit {
            Some(entry) => self.take_hit(step, entry, history)?,
            None => self.run(step_no, step, history)?,
        }
        self.shared.emit(BuildEvent::StepFinished {
            stage: self.index,
            step: step_no,
            duration: started.elapsed(),
            cached,
        });
        Ok(())
    }

    /// A cache hit: the step's config edit and its cached layer, nothing run.
    fn take_hit(
        &mut self,
        step: &Step,
        entry: kiln_cache::CacheEntry,
        history: History,
    ) -> Result<(), BuildError> {
        let shared = self.shared;
        let cache = shared.cache.as_ref().expect("hits come from the cache");
        ops::edit_config(&step.operation, &mut self.image, &mut self.edits);
        match &entry.layer {
            Some(cached) => {
                let layer = cache.hit_layer(&shared.runtime, &shared.blobs, cached)?;
                if self.prepared.is_some() {
                    self.apply_hit(step, (cached.clone(), layer.clone()))?;
                    let (snapshotter, _) = self.prepared.as_mut().expect("prepared above");
                    snapshotter
                        .rescan()
                        .map_err(|e| BuildError::image(format!("stage {}", self.index), e))?;
                } else {
                    self.materializer
                        .pending_cached
                        .push((cached.clone(), layer.clone()));
                }
                if !self.fully_cached {
                    shared.push_ahead(self.index, std::slice::from_ref(&layer));
                }
                let history = History {
                    created: entry.history.created.clone(),
                    ..history
                };
                self.step_layers.push(Some(layer.diff_id.to_string()));
                self.image.push_layer(layer.diff_id.clone(), history);
                self.layers.push(layer);
            }
            None => {
                self.step_layers.push(None);
                self.image.push_empty_layer_history(history)
            }
        }
        self.record_slots.push(RecordSlot::Known(Box::new(entry)));
        Ok(())
    }

    /// Records the layer of a step that ran (or its empty history), and writes its cache entry
    /// in the background.
    fn add_layer(
        &mut self,
        step: &Step,
        step_no: usize,
        layer: Option<ImageLayer>,
        history: History,
    ) {
        let shared = self.shared;
        let key = self.plan.keys.get(step_no).cloned().flatten();
        match layer {
            Some(layer) => {
                // A layer's history carries the time it was made, and the cache entry keeps
                // it, so a rebuild from the cache dates the layer as the first build did.
                let history = History {
                    created: Some(crate::output::now_rfc3339()),
                    ..history
                };
                shared.push_ahead(self.index, std::slice::from_ref(&layer));
                if let (Some(cache), Some(key)) = (&shared.cache, key) {
                    let path = shared.blobs.blob_path(&layer.descriptor.digest);
                    self.record_slots.extend(cache.store_in_background(
                        &shared.runtime,
                        key,
                        &step.operation,
                        Some((&layer, &path)),
                        shared.push_ahead.as_ref(),
                        &self.image.config,
                        &history,
                    ));
                }
                self.step_layers.push(Some(layer.diff_id.to_string()));
                self.image.push_layer(layer.diff_id.clone(), history);
                self.layers.push(layer);
            }
            None => {
                self.step_layers.push(None);
                if let (Some(cache), Some(key)) = (&shared.cache, key) {
                    self.record_slots.extend(cache.store_in_background(
                        &shared.runtime,
                        key,
                        &step.operation,
                        None,
                        None,
                        &self.image.config,
                        &history,
                    ));
                }
                self.image.push_empty_layer_history(history);
            }
        }
    }

    /// The stage's result, its tree left for later stages to read, its record written.
    fn finish(mut self, _steps: &[Step]) -> Result<StageOutput, BuildError> {
        let shared = self.shared;
        let in_place = shared.mode == Mode::InPlace;
        let target = shared.plan.target();
        // --materialize (kaniko's flag): in place, `/` ends as the target's filesystem even
        // when every step was a hit.
        if in_place && self.index == target && shared.options.materialize && self.prepared.is_none()
        {
            self.prepared = Some(self.materializer.materialize()?);
        }
        // A stage that never needed its tree leaves it to be unpacked from its layers when a
        // later stage reads it. In place, the next stage wipes `/`: a non-target stage's tree is
        // rebuilt from its layers the same way.
        let (rootfs, ready) = if in_place && self.index != target {
            (shared.work_dir.join(format!("stage-{}", self.index)), false)
        } else {
            (self.rootfs.to_path_buf(), self.prepared.is_some())
        };
        drop(self.prepared.take());
        if let (Some(cache), Some(locator)) = (&shared.cache, self.plan.locator.take()) {
            // Every step keyed and the record short of something: record what this build knows.
            if self.plan.final_key.is_some() && !self.plan.answered_by_record {
                cache.record_in_background(
                    &shared.runtime,
                    locator,
                    self.recorded_base.take(),
                    std::mem::take(&mut self.record_slots),
                );
            }
        }
        Ok(StageOutput {
            rootfs,
            ready: Mutex::new(ready),
            config: self.image,
            layers: self.layers,
            base_image: self.base_image,
            cache_key: self.plan.final_key,
            fully_cached: self.fully_cached,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_ids;

    /// A rootfs whose user `app` has a primary group (2000) that differs from its uid (1500).
    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1500:2000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nstaff:x:2000:\nweb:x:3000:\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn chown_by_name_takes_the_primary_group_from_passwd() {
        let root = rootfs();
        assert_eq!(resolve_ids(root.path(), "app", true), Ok((1500, 2000)));
        assert_eq!(resolve_ids(root.path(), "app:web", true), Ok((1500, 3000)));
        assert_eq!(resolve_ids(root.path(), "app:4000", true), Ok((1500, 4000)));
    }

    #[test]
    fn chown_by_id_uses_the_uid_as_gid_but_user_takes_the_primary_group() {
        let root = rootfs();
        assert_eq!(resolve_ids(root.path(), "1500", true), Ok((1500, 1500)));
        assert_eq!(resolve_ids(root.path(), "4242", true), Ok((4242, 4242)));
        assert_eq!(resolve_ids(root.path(), "1500", false), Ok((1500, 2000)));
        assert_eq!(resolve_ids(root.path(), "app", false), Ok((1500, 2000)));
    }
}

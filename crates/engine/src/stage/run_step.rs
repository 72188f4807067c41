//! Running one step that was not a cache hit: its operation's execution, the snapshot of what
//! it changed, and the layer made of that.

use std::path::{Path, PathBuf};

use kiln_fs::layer::write_layer;
use kiln_fs::snapshot::{ChangeKind, Diff, IgnoreOptions, Index, SnapshotOptions, Snapshotter};
use kiln_oci::image::{Descriptor, History};
use kiln_oci::MediaType;
use kiln_plan::{Copy, Mkdir, Operation, Run, Step};

use super::overlay::{human_size, FullnessWatch};
use super::{resolve_ids, StageRun, StepContext};
use crate::base::ImageLayer;
use crate::error::BuildError;
use crate::events::{BuildEvent, Phase};
use crate::ops::cache_mount::CacheMountStore;
use crate::ops::copy::tree::clean_relative;
use crate::ops::run::RunContext;
use crate::ops::{self, copy, mkdir};

impl StageRun<'_> {
    /// Runs `step`: applies its config edit, and for an operation that writes files, executes it
    /// in the rootfs (made now if it does not exist yet) and makes the layer of its changes.
    pub(super) fn run(
        &mut self,
        step_no: usize,
        step: &Step,
        history: History,
    ) -> Result<(), BuildError> {
        let mkdir_target = match &step.operation {
            Operation::Mkdir(op) => Some(mkdir::target(op, &self.image.config)),
            _ => None,
        };
        ops::edit_config(&step.operation, &mut self.image, &mut self.edits);
        if self.single_snapshot {
            return self.run_unsnapshotted(step_no, step, history, mkdir_target);
        }
        if !step.operation.writes_files() {
            let layer = self.forced_layer(step_no, step, None)?;
            self.add_layer(step, step_no, layer, history);
            return Ok(());
        }
        if self.prepared.is_none() && !defers_rootfs(&step.operation) {
            self.prepare(step)?;
        }
        if self.prepared.is_some() && self.materializer.upper_tmpfs_filling() {
            // Later steps get the room they may need; this one's would be too little.
            self.spill(step, false)?;
        }
        let target = mkdir_target.unwrap_or_default();
        let layer = loop {
            let watch = self
                .prepared
                .as_ref()
                .and_then(|_| self.materializer.watch_upper_tmpfs());
            let made = self.execute_step(step_no, step, &target);
            let filled = watch.is_some_and(FullnessWatch::filled);
            match made {
                // It may have failed for want of room on the tmpfs: on disk it gets the room
                // it would have had without the tmpfs, and a real failure fails again there.
                // Steps are run again from the stage's layers, never from what the failed
                // attempt left in the upper dir. The upper dir is on disk from then on, so
                // this happens once per stage at most.
                Err(_) if filled => {
                    self.shared.cancel.check()?;
                    self.spill(step, true)?;
                }
                made => break made?,
            }
        };
        let layer = self.forced_layer(step_no, step, layer)?;
        self.add_layer(step, step_no, layer, history);
        Ok(())
    }

    /// Executes a step that writes files and makes the layer of its changes.
    fn execute_step(
        &mut self,
        step_no: usize,
        step: &Step,
        mkdir_target: &Path,
    ) -> Result<Option<ImageLayer>, BuildError> {
        match &step.operation {
            Operation::Run(op) => self.run_program(step_no, step, op),
            Operation::Copy(op) if op.link => self.copy_linked(step_no, step, op),
            Operation::Copy(op) => self.copy(step_no, step, op),
            Operation::Mkdir(op) => self.make_directory(step_no, step, op, mkdir_target),
            Operation::Config(_) => Ok(None),
        }
    }

    /// Brings the stage's rootfs into being for `step`. Cache hits applied onto a tmpfs upper
    /// dir that fill it do not fail the build: the stage is then made on disk.
    pub(super) fn prepare(&mut self, step: &Step) -> Result<(), BuildError> {
        match self.materializer.materialize() {
            Ok(prepared) => {
                self.prepared = Some(prepared);
                Ok(())
            }
            Err(_) if self.materializer.upper_tmpfs_filling() => self.spill(step, false),
            Err(e) => Err(e),
        }
    }

    /// Applies cache `hit` of `step` onto the prepared rootfs; when that fills the tmpfs upper
    /// dir, the stage moves to disk and the hit's layer is applied there (applying a layer
    /// again over what a failed attempt left is not needed: the move rebuilds the upper dir
    /// from the layers before it).
    pub(super) fn apply_hit(
        &mut self,
        step: &Step,
        hit: (kiln_cache::CachedLayer, ImageLayer),
    ) -> Result<(), BuildError> {
        let hit = [hit];
        let watch = self.materializer.watch_upper_tmpfs();
        let applied = self.materializer.apply_cached(&hit);
        let filled = watch.is_some_and(FullnessWatch::filled);
        match applied {
            Err(_) if filled => {
                self.shared.cancel.check()?;
                self.spill(step, false)?;
                self.materializer.apply_cached(&hit)
            }
            applied => applied,
        }
    }

    /// Moves the stage's upper dir from the tmpfs to disk, saying so; `failed` when `step`
    /// failed on the tmpfs and runs again.
    fn spill(&mut self, step: &Step, failed: bool) -> Result<(), BuildError> {
        let cap = self.materializer.upper_tmpfs_cap().unwrap_or(0);
        let at = step.provenance.location();
        let cap = human_size(cap);
        let message = if failed {
            format!(
                "{at}: the tmpfs upper dir (cap {cap}) is full: the stage continues on disk and \
                 the step runs again"
            )
        } else {
            format!(
                "{at}: the tmpfs upper dir (cap {cap}) is more than three quarters full: the \
                 stage continues on disk"
            )
        };
        self.shared.emit(BuildEvent::Note { message });
        drop(self.prepared.take());
        let layers: Vec<ImageLayer> = self
            .layers
            .iter()
            .enumerate()
            .skip(self.base_layers)
            .filter(|(i, _)| !self.outside_rootfs.contains(i))
            .map(|(_, layer)| layer.clone())
            .collect();
        self.prepared = Some(self.materializer.spill_to_disk(&layers)?);
        Ok(())
    }

    /// `layer`, or under `--force-build-metadata` an empty layer in place of none, so every
    /// step of the stage is one layer of the image.
    fn forced_layer(
        &mut self,
        step_no: usize,
        step: &Step,
        layer: Option<ImageLayer>,
    ) -> Result<Option<ImageLayer>, BuildError> {
        if layer.is_some() || !self.every_step_layered {
            return Ok(layer);
        }
        let rootfs = self.rootfs;
        let layer = self
            .shared
            .timed(Some(self.index), Some(step_no), Phase::Layer, || {
                self.write(rootfs, &Diff::default(), step_no, step)
            })?;
        Ok(Some(layer))
    }

    /// `--single-snapshot`: the step runs with no snapshot of its own; after the stage's last
    /// step, one snapshot of everything since the base is the stage's one layer, attributed to
    /// that step in the history (as kaniko does).
    fn run_unsnapshotted(
        &mut self,
        step_no: usize,
        step: &Step,
        history: History,
        mkdir_target: Option<PathBuf>,
    ) -> Result<(), BuildError> {
        if self.prepared.is_none() {
            self.prepared = Some(self.materializer.materialize()?);
        }
        match &step.operation {
            Operation::Run(op) => self.execute_program(step_no, step, op).map(drop)?,
            Operation::Copy(op) => {
                let ctx = self.context(step_no, step);
                self.shared
                    .timed(Some(self.index), Some(step_no), Phase::Execute, || {
                        copy::execute(&ctx, op, self.rootfs)
                    })?;
            }
            Operation::Mkdir(_) => {
                let target = mkdir_target.unwrap_or_default();
                if !mkdir::exists(self.rootfs, &target) {
                    self.create_directory(step, &target)?;
                }
            }
            Operation::Config(_) => {}
        }
        if step_no + 1 < self.step_count {
            self.add_layer(step, step_no, None, history);
            return Ok(());
        }
        let (snapshotter, _) = self.prepared.as_mut().expect("materialized above");
        let diff = snapshotter
            .snapshot()
            .map_err(|e| BuildError::step(step.provenance.location(), format!("snapshot: {e}")))?;
        let layer = self.layer_of(step_no, step, diff, None)?;
        let layer = self.forced_layer(step_no, step, layer)?;
        self.add_layer(step, step_no, layer, history);
        Ok(())
    }

    fn context<'s>(&'s self, step_no: usize, step: &'s Step) -> StepContext<'s> {
        StepContext {
            shared: self.shared,
            stage: self.index,
            step: step_no,
            rootfs: self.rootfs,
            image: &self.image,
            at: &step.provenance,
        }
    }

    fn run_program(
        &mut self,
        step_no: usize,
        step: &Step,
        op: &Run,
    ) -> Result<Option<ImageLayer>, BuildError> {
        let restored = self.execute_program(step_no, step, op)?;
        let diff = self
            .shared
            .timed(Some(self.index), Some(step_no), Phase::Snapshot, || {
                self.snapshot_after_run(&restored, step)
            })?;
        self.layer_of(step_no, step, diff, None)
    }

    /// Runs the program of a run step; returns the directories whose times the sandbox put
    /// back.
    fn execute_program(
        &mut self,
        step_no: usize,
        step: &Step,
        op: &Run,
    ) -> Result<Vec<PathBuf>, BuildError> {
        let shared = self.shared;
        let index = self.index;
        let scratch = shared.work_dir.join(format!("scratch-{index}-{step_no}"));
        let mount_source = |from: &kiln_plan::Source| shared.mount_source(from);
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
            cancel: shared.cancel.steps(),
        };
        let sandbox = &*self.prepared.as_ref().expect("materialized for run").1;
        let outcome = shared.timed(Some(index), Some(step_no), Phase::Execute, || {
            ops::run::run(sandbox, &ctx, op, &self.image.config)
        });
        let _ = std::fs::remove_dir_all(&scratch);
        let at = step.provenance.location();
        let outcome = outcome.map_err(|e| BuildError::step(&at, format!("RUN: {e}")))?;
        if !outcome.status.success() {
            return Err(BuildError::RunFailed {
                what: step
                    .provenance
                    .text
                    .split_whitespace()
                    .next()
                    .unwrap_or("RUN")
                    .to_owned(),
                at,
                code: outcome.status.code(),
            });
        }
        Ok(outcome
            .restored_dirs
            .iter()
            .map(|d| clean_relative(d))
            .collect())
    }

    fn copy(
        &mut self,
        step_no: usize,
        step: &Step,
        op: &Copy,
    ) -> Result<Option<ImageLayer>, BuildError> {
        let shared = self.shared;
        let copied = shared.timed(Some(self.index), Some(step_no), Phase::Execute, || {
            copy::execute(&self.context(step_no, step), op, self.rootfs)
        })?;
        if !copied.as_keyed && self.plan.keys.get(step_no).is_some_and(Option::is_some) {
            // The key names content this download is not.
            self.plan.unkey_from(step_no);
            shared.emit(BuildEvent::Warning {
                message: format!(
                    "{}: ADD: the server's validators changed between keying and downloading; this step and the rest of the stage are not cached",
                    step.provenance.location()
                ),
            });
        }
        let diff = shared.timed(Some(self.index), Some(step_no), Phase::Snapshot, || {
            self.snapshot_paths(&copied.written, step)
        })?;
        self.layer_of(step_no, step, diff, Some(&copied.written))
    }

    /// A copy made on its own: in an empty tree, whose whole content is the layer, which is
    /// then applied to the rootfs as a cached layer would be.
    /// The layer of the copy's image named by [`Copy::reuse_layer`], brought into the blob
    /// store; `None` when the copy names none or the image has no such layer (said in a note):
    /// the files are then copied.
    fn reused_layer(
        &self,
        step_no: usize,
        step: &Step,
        op: &Copy,
    ) -> Result<Option<ImageLayer>, BuildError> {
        let (Some(diff_id), Some(kiln_plan::Source::Image(image))) = (&op.reuse_layer, &op.from)
        else {
            return Ok(None);
        };
        let shared = self.shared;
        let at = step.provenance.location();
        let found = shared.timed(Some(self.index), Some(step_no), Phase::Pull, || {
            shared
                .block_on(async {
                    let manifest = match shared.remote.image_manifest(image) {
                        Some(pinned) => pinned,
                        None => {
                            crate::base::resolve_manifest(&shared.client, image, &shared.platform)
                                .await?
                        }
                    };
                    let pulled = manifest.with_config(&shared.client, None).await?;
                    let layer = pulled
                        .layers
                        .into_iter()
                        .find(|layer| layer.diff_id.to_string() == *diff_id);
                    if let Some(layer) = &layer {
                        crate::output::ensure_local(
                            &shared.client,
                            &shared.blobs,
                            std::slice::from_ref(layer),
                        )
                        .await?;
                    }
                    Ok::<_, BuildError>(layer)
                })
                .and_then(|found| found)
        });
        let layer = found.map_err(|e| BuildError::step(&at, format!("{image}: {e}")))?;
        if layer.is_none() {
            shared.emit(BuildEvent::Note {
                message: format!(
                    "{at}: {image} has no layer {diff_id} to reuse: its files are copied instead"
                ),
            });
        }
        Ok(layer)
    }

    fn copy_linked(
        &mut self,
        step_no: usize,
        step: &Step,
        op: &Copy,
    ) -> Result<Option<ImageLayer>, BuildError> {
        let shared = self.shared;
        if let Some(layer) = self.reused_layer(step_no, step, op)? {
            // Its files never go into the rootfs: a stage moved to disk leaves it out too.
            self.outside_rootfs.push(self.layers.len());
            return Ok(Some(layer));
        }
        let name = format!("link-{}-{step_no}", self.index);
        let on_tmpfs = shared.scratch_dir().and_then(|scratch| {
            // Whatever fails on the tmpfs (most likely, it filled up) is done again on disk,
            // where a real failure recurs and is reported.
            self.linked_layer_in(step_no, step, op, &scratch.join(&name))
                .ok()
        });
        let layer = match on_tmpfs {
            Some(layer) => layer,
            None => self.linked_layer_in(step_no, step, op, &shared.work_dir.join(&name))?,
        };
        if let Some(layer) = &layer {
            match self.prepared.as_mut() {
                Some((snapshotter, _)) => {
                    self.materializer
                        .apply_layers(std::slice::from_ref(layer))?;
                    snapshotter
                        .rescan()
                        .map_err(|e| BuildError::image(format!("stage {}", self.index), e))?;
                }
                // No step has needed the rootfs yet: the layer waits, as a cache hit does, and
                // goes onto the base when a step needs the tree (or never, when none does).
                None => self.materializer.pending_cached.push((
                    kiln_cache::CachedLayer {
                        descriptor: layer.descriptor.clone(),
                        diff_id: layer.diff_id.clone(),
                    },
                    layer.clone(),
                )),
            }
        }
        Ok(layer)
    }

    /// The layer of a linked copy made in a fresh tree at `tree`, removed afterwards.
    fn linked_layer_in(
        &self,
        step_no: usize,
        step: &Step,
        op: &Copy,
        tree: &Path,
    ) -> Result<Option<ImageLayer>, BuildError> {
        let shared = self.shared;
        std::fs::create_dir_all(tree).map_err(BuildError::io(tree))?;
        let made: Result<Option<ImageLayer>, BuildError> = (|| {
            let copied = shared.timed(Some(self.index), Some(step_no), Phase::Execute, || {
                copy::execute(&self.context(step_no, step), op, tree)
            })?;
            let options = SnapshotOptions {
                mode: shared.options.snapshot.mode,
                ignore: IgnoreOptions {
                    system_paths: false,
                    var_run: false,
                    mount_points: false,
                    extra: Vec::new(),
                },
            };
            let mut snapshotter = Snapshotter::new(tree, Index::new(), &options)
                .map_err(|e| BuildError::step(step.provenance.location(), e))?;
            let diff = snapshotter
                .snapshot()
                .map_err(|e| BuildError::step(step.provenance.location(), e))?;
            self.check_not_lost(&diff, tree, Some(&copied.written), step)?;
            if diff.is_empty() {
                return Ok(None);
            }
            let layer = shared.timed(Some(self.index), Some(step_no), Phase::Layer, || {
                self.write(tree, &diff, step_no, step)
            })?;
            Ok(Some(layer))
        })();
        let _ = std::fs::remove_dir_all(tree);
        made
    }

    fn make_directory(
        &mut self,
        step_no: usize,
        step: &Step,
        _op: &Mkdir,
        target: &Path,
    ) -> Result<Option<ImageLayer>, BuildError> {
        if mkdir::exists(self.rootfs, target) {
            return Ok(None);
        }
        let created = self.create_directory(step, target)?;
        let diff = self.snapshot_paths(&created, step)?;
        self.layer_of(step_no, step, diff, Some(&created))
    }

    /// Creates the directory of a mkdir step, owned by the config's user.
    fn create_directory(&self, step: &Step, target: &Path) -> Result<Vec<PathBuf>, BuildError> {
        let at = step.provenance.location();
        let user = self.image.config.user.clone().unwrap_or_default();
        let (uid, gid) = resolve_ids(self.rootfs, &user, false)
            .map_err(|e| BuildError::step(&at, format!("WORKDIR: {e}")))?;
        mkdir::execute(self.rootfs, target, uid, gid)
            .map_err(|e| BuildError::step(&at, format!("WORKDIR: {e}")))
    }

    /// The snapshot after a run. The sandbox created and removed mount targets in `restored`
    /// and put their times back: only their ctime moved, which is no change an image shows.
    fn snapshot_after_run(
        &mut self,
        restored: &[PathBuf],
        step: &Step,
    ) -> Result<Diff, BuildError> {
        let (snapshotter, _) = self.prepared.as_mut().expect("materialized for run");
        let mut before = Vec::new();
        for path in restored {
            let entry = snapshotter.entry(path).map_err(|e| {
                BuildError::step(step.provenance.location(), format!("snapshot: {e}"))
            })?;
            if let Some(entry) = entry {
                before.push((path.clone(), entry));
            }
        }
        let mut diff = snapshotter
            .snapshot()
            .map_err(|e| BuildError::step(step.provenance.location(), format!("snapshot: {e}")))?;
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

    fn snapshot_paths(&mut self, written: &[PathBuf], step: &Step) -> Result<Diff, BuildError> {
        let (snapshotter, _) = self.prepared.as_mut().expect("materialized for a write");
        snapshotter
            .snapshot_paths(written)
            .map_err(|e| BuildError::step(step.provenance.location(), format!("snapshot: {e}")))
    }

    /// The layer of `diff` (none when it is empty), after checking that a step which wrote
    /// files did not come out empty.
    fn layer_of(
        &mut self,
        step_no: usize,
        step: &Step,
        diff: Diff,
        written: Option<&[PathBuf]>,
    ) -> Result<Option<ImageLayer>, BuildError> {
        self.check_not_lost(&diff, self.rootfs, written, step)?;
        if diff.is_empty() {
            return Ok(None);
        }
        let rootfs = self.rootfs;
        let layer = self
            .shared
            .timed(Some(self.index), Some(step_no), Phase::Layer, || {
                self.write(rootfs, &diff, step_no, step)
            })?;
        Ok(Some(layer))
    }

    /// A step that reports files it wrote (not only directories) must have a non-empty diff: an
    /// empty one means the snapshot looked somewhere else than the files went, which would
    /// silently drop them from the image.
    fn check_not_lost(
        &self,
        diff: &Diff,
        root: &Path,
        written: Option<&[PathBuf]>,
        step: &Step,
    ) -> Result<(), BuildError> {
        let Some(written) = written.filter(|_| diff.is_empty()) else {
            return Ok(());
        };
        let Ok(tree) = kiln_fs::resolve::Root::open(root) else {
            return Ok(());
        };
        let lost = written
            .iter()
            .find(|path| tree.symlink_metadata(path).is_ok_and(|m| !m.is_dir()));
        match lost {
            Some(path) => Err(BuildError::step(
                step.provenance.location(),
                format!(
                    "internal error: /{} was written but the step's layer is empty",
                    path.display()
                ),
            )),
            None => Ok(()),
        }
    }

    fn write(
        &self,
        root: &Path,
        diff: &Diff,
        step_no: usize,
        step: &Step,
    ) -> Result<ImageLayer, BuildError> {
        let shared = self.shared;
        let blob = write_layer(root, diff, &shared.blobs, &self.layer_options).map_err(|e| {
            // The blob store is where a layer takes space: a full disk is said with its path.
            let cause = match e {
                kiln_fs::layer::LayerError::Write(source) => source.to_string(),
                other => other.to_string(),
            };
            BuildError::step(
                step.provenance.location(),
                format!(
                    "writing layer of step {step_no} to {}: {cause}",
                    shared.blobs.root().display()
                ),
            )
        })?;
        shared.emit(BuildEvent::LayerCreated {
            stage: self.index,
            step: step_no,
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
}

/// Whether `operation` can run before the stage's rootfs exists: a linked copy is made in a
/// tree of its own (BuildKit's `--link`: independent of what is below it), unless an owner
/// name must be looked up in the stage's passwd and group files. A stage whose steps are all
/// such copies (a buildpacks export on its run image) never unpacks its base.
fn defers_rootfs(operation: &Operation) -> bool {
    matches!(operation, Operation::Copy(op) if op.link && op.chown.is_none())
}

//! A stage's base: resolving it (an image's manifest and config, an earlier stage's result, or
//! nothing), and bringing its filesystem into being only when a step has to run — with the
//! layer cache, a stage whose steps are all hits never pulls or unpacks anything.

use std::path::{Path, PathBuf};

use kiln_fs::snapshot::{IgnoreOptions, Index, SnapshotOptions, Snapshotter};
use kiln_oci::image::ImageConfig;
use kiln_plan::{Base, BaseFacts};
use kiln_sandbox::Sandbox;

use crate::base::{self, ImageLayer};
use crate::error::BuildError;
use crate::events::{BuildEvent, Phase};
use crate::inplace;
use crate::ops::config::env_pairs;
use crate::shared::Shared;

/// BuildKit's default `PATH`, which every stage's config gets when its base sets none.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a stage starts from, once its base is resolved.
pub(crate) struct Start {
    /// The config the stage's steps edit.
    pub(crate) image: ImageConfig,
    /// The base's layers.
    pub(crate) layers: Vec<ImageLayer>,
    /// The base image, when the stage (or the stage it starts from) came from one.
    pub(crate) base_image: Option<(String, kiln_oci::Digest)>,
    /// What the cache keys of the stage chain from, when known.
    pub(crate) cache_parent: Option<kiln_cache::Parent>,
    /// The image config as fetched, for the stage record.
    pub(crate) recorded_base: Option<kiln_cache::RecordedBase>,
    /// The stage record found with the base manifest, and where it is kept.
    pub(crate) record: Option<(kiln_cache::StageLocator, Option<kiln_cache::StageRecord>)>,
}

impl Start {
    /// The facts of the base a front end writes the stage's steps with: its environment (with
    /// the default PATH when it sets none), its build triggers, working directory and user.
    pub(crate) fn facts(&self) -> BaseFacts {
        let config = &self.image.config;
        BaseFacts {
            env: env_pairs(config),
            on_build: config.on_build.clone().unwrap_or_default(),
            working_dir: config.working_dir.clone().filter(|w| !w.is_empty()),
            user: config.user.clone().filter(|u| !u.is_empty()),
            known: true,
        }
    }
}

/// Gives `image` BuildKit's default `PATH` when its environment has none: images assembled by
/// other tools often set no `Env`, and without `PATH` neither RUN nor the container finds a
/// program by name (and `ENV PATH=/opt/bin:$PATH` would make `PATH=/opt/bin:`).
pub(crate) fn ensure_path(image: &mut ImageConfig) {
    let has_path = image
        .config
        .env
        .iter()
        .flatten()
        .any(|kv| kv.starts_with("PATH="));
    if !has_path {
        image.config.set_env_var("PATH", DEFAULT_PATH);
    }
}

/// Brings a stage's rootfs into being only when a step has to run.
pub(crate) struct Materializer<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) index: usize,
    pub(crate) rootfs: &'a Path,
    pub(crate) at: String,
    pub(crate) in_place: bool,
    pub(crate) in_place_ignore: &'a IgnoreOptions,
    pub(crate) snapshot_options: &'a SnapshotOptions,
    /// A base image whose layers are not unpacked yet.
    pub(crate) pending_base: Option<String>,
    /// A base stage whose tree is not copied yet.
    pub(crate) pending_stage: Option<usize>,
    /// Cache hits taken before the rootfs existed, to apply on top of the base.
    pub(crate) pending_cached: Vec<(kiln_cache::CachedLayer, ImageLayer)>,
    pub(crate) base_index: Option<Index>,
    pub(crate) rescan: bool,
    /// The overlay mounted at the rootfs, once mounted: the snapshotter reads a step's
    /// changes from its upper dir.
    pub(crate) mounted: Option<super::overlay::Mounted>,
}

impl Materializer<'_> {
    /// Unpacks what is pending and prepares the snapshotter and the RUN sandbox.
    pub(crate) fn materialize(&mut self) -> Result<(Snapshotter, Box<dyn Sandbox>), BuildError> {
        let shared = self.shared;
        let mut index_of_rootfs = self.base_index.take().unwrap_or_default();
        if let Some(image) = self.pending_base.take() {
            self.bring_base(&image, &mut index_of_rootfs)?;
        }
        if let Some(parent) = self.pending_stage.take() {
            self.copy_parent_stage(parent)?;
        }
        let cached = std::mem::take(&mut self.pending_cached);
        if !cached.is_empty() {
            self.apply_cached(&cached)?;
            self.rescan = true;
        }
        let mut snapshotter = Snapshotter::new(self.rootfs, index_of_rootfs, self.snapshot_options)
            .map_err(|e| BuildError::image(format!("stage {}", self.index), e))?;
        let indexed = match &self.mounted {
            // Nothing written through the mount yet: the index fills from a mount of the same
            // lower dirs as steps touch paths, instead of a walk of the whole base now.
            Some(mounted) if !self.rescan => match self.mount_lower_view(mounted)? {
                Some(view) => snapshotter.follow_upper_dir_over(&mounted.upper, view),
                None => snapshotter
                    .rescan()
                    .and_then(|()| snapshotter.follow_upper_dir(&mounted.upper)),
            },
            Some(mounted) => snapshotter
                .rescan()
                .and_then(|()| snapshotter.follow_upper_dir(&mounted.upper)),
            None if self.rescan => snapshotter.rescan(),
            None => Ok(()),
        };
        indexed.map_err(|e| BuildError::image(format!("stage {}", self.index), e))?;
        let sandbox: Box<dyn Sandbox> =
            kiln_sandbox::open(shared.mode, self.rootfs).map_err(|e| {
                BuildError::step(&self.at, format!("cannot prepare the RUN sandbox: {e}"))
            })?;
        Ok((snapshotter, sandbox))
    }

    /// Brings base `image` into the rootfs: pulled into the blob store and mounted as an
    /// overlay with the pending cache hits when the build mounts bases and can here (the
    /// snapshotter then indexes the tree with one walk); else pulled and unpacked, indexed in
    /// `index`, with `--image-fs-extract-retry`'s retries (a damaged stored blob of a layer with
    /// no tree is fetched again).
    pub(crate) fn bring_base(
        &mut self,
        image: &str,
        index: &mut Index,
    ) -> Result<base::PulledImage, BuildError> {
        if let Some(pulled) = self.pull_for_mount(image)? {
            if self.mount_layers(&pulled.layers)? {
                return Ok(pulled);
            }
        }
        pull_base_into(
            self.shared,
            self.index,
            &self.at,
            image,
            self.in_place.then_some(self.in_place_ignore),
            self.rootfs,
            index,
        )
    }

    /// The tree of the stage this one is built FROM, as this stage's own.
    fn copy_parent_stage(&self, parent: usize) -> Result<(), BuildError> {
        let shared = self.shared;
        let at = &self.at;
        let stage_error = |e: BuildError| BuildError::step(at, format!("FROM stage {parent}: {e}"));
        let parent_output = shared
            .finished(parent)
            .ok_or_else(|| BuildError::image(format!("stage {parent}"), "it has not been built"))
            .map_err(stage_error)?;
        if self.in_place {
            // `/` was the parent's until the wipe: its layers rebuild it.
            shared.block_on(crate::output::ensure_local(
                &shared.client,
                &shared.blobs,
                &parent_output.layers,
            ))??;
            shared
                .timed(Some(self.index), None, Phase::Unpack, || {
                    unpack_in_place(shared, self.in_place_ignore, &parent_output.layers)
                })
                .map_err(stage_error)
        } else {
            let tree = shared.stage_rootfs(parent).map_err(stage_error)?;
            shared.timed(Some(self.index), None, Phase::Unpack, || {
                kiln_fs::clone::clone_tree(&tree, self.rootfs).map_err(|e| BuildError::Io {
                    path: e.path,
                    source: e.source,
                })
            })
        }
    }

    /// Fetches cached layers into the blob store and unpacks them onto the rootfs.
    pub(crate) fn apply_cached(
        &self,
        cached: &[(kiln_cache::CachedLayer, ImageLayer)],
    ) -> Result<(), BuildError> {
        let shared = self.shared;
        if let Some(cache) = shared.cache.as_ref() {
            for (entry, _) in cached {
                cache.fetch_blob(&shared.runtime, &shared.blobs, entry)?;
            }
        }
        let layers: Vec<ImageLayer> = cached.iter().map(|(_, layer)| layer.clone()).collect();
        self.apply_layers(&layers)
    }

    /// Unpacks `layers` (in the blob store) onto the rootfs.
    pub(crate) fn apply_layers(&self, layers: &[ImageLayer]) -> Result<(), BuildError> {
        let shared = self.shared;
        shared.timed(Some(self.index), None, Phase::Unpack, || {
            if self.in_place {
                unpack_in_place(shared, self.in_place_ignore, layers)
            } else {
                base::unpack_into(self.rootfs, layers, &shared.blobs, &mut Index::new())
            }
        })
    }
}

/// Pulls base `image` and unpacks it into the stage's tree: `rootfs` (indexing it in `index`),
/// or `/` in in-place mode (`in_place_ignore` given), sparing ignored paths. Layers download and
/// unpack at the same time, so the two are one `pull` phase.
pub(crate) fn pull_base_into(
    shared: &Shared,
    stage: usize,
    at: &str,
    image: &str,
    in_place_ignore: Option<&IgnoreOptions>,
    rootfs: &Path,
    index: &mut Index,
) -> Result<base::PulledImage, BuildError> {
    let retries = shared.options.extract_retries;
    let mut attempt = 0;
    loop {
        match pull_base_once(shared, stage, at, image, in_place_ignore, rootfs, index) {
            Err(e) if attempt < retries => {
                attempt += 1;
                shared.emit(BuildEvent::Warning {
                    message: format!(
                        "{e}; pulling and unpacking it again (--image-fs-extract-retry, \
                         {attempt} of {retries})"
                    ),
                });
                // In place, unpacking again overwrites what the failed attempt wrote; a
                // stage's own tree starts empty again.
                if in_place_ignore.is_none() {
                    empty_directory(rootfs)?;
                    *index = Index::new();
                }
            }
            outcome => return outcome,
        }
    }
}

/// Removes everything inside `dir`, keeping `dir` itself. Through its `Root`, so a symlink a
/// failed unpack left there is removed, never followed.
fn empty_directory(dir: &Path) -> Result<(), BuildError> {
    let failed = |e| BuildError::image(dir.display().to_string(), e);
    kiln_fs::resolve::Root::open(dir)
        .and_then(|root| root.remove_contents())
        .map_err(failed)
}

fn pull_base_once(
    shared: &Shared,
    stage: usize,
    at: &str,
    image: &str,
    in_place_ignore: Option<&IgnoreOptions>,
    rootfs: &Path,
    index: &mut Index,
) -> Result<base::PulledImage, BuildError> {
    let cache_dir = shared.options.cache.dir.as_deref();
    shared
        .timed(Some(stage), None, Phase::Pull, || match in_place_ignore {
            Some(ignore) => {
                let pulled = pull_to_store(shared, image)?;
                unpack_in_place(shared, ignore, &pulled.layers)?;
                Ok(pulled)
            }
            None => base::pull_and_unpack(
                &shared.runtime,
                &shared.cancel,
                &shared.client,
                &shared.blobs,
                image,
                &shared.platform,
                &shared.events,
                rootfs,
                index,
                cache_dir,
            ),
        })
        .map_err(|e: BuildError| BuildError::step(at, format!("FROM {image}: {e}")))
}

/// Pulls base `image` into the blob store only, for a caller that unpacks (or mounts) it itself.
pub(crate) fn pull_to_store(shared: &Shared, image: &str) -> Result<base::PulledImage, BuildError> {
    shared.block_on(base::pull(
        &shared.client,
        &shared.blobs,
        image,
        &shared.platform,
        &*shared.events,
        shared.options.cache.dir.as_deref(),
    ))?
}

/// Unpacks `layers` into `/` (in-place mode), sparing the paths `ignore` names and warning
/// about what the layers hold inside them.
fn unpack_in_place(
    shared: &Shared,
    ignore: &IgnoreOptions,
    layers: &[ImageLayer],
) -> Result<(), BuildError> {
    let warn = |message: String| shared.emit(BuildEvent::Warning { message });
    inplace::unpack_into_root(
        layers,
        &shared.blobs,
        &inplace::ignore_set(ignore)?,
        &shared.options,
        &warn,
    )
}

/// The stage's rootfs directory: `/` in place, else a directory of the work dir.
pub(crate) fn rootfs_of(shared: &Shared, index: usize, in_place: bool) -> PathBuf {
    if in_place {
        PathBuf::from("/")
    } else {
        shared.work_dir.join(format!("stage-{index}"))
    }
}

/// What `base` is called in progress output.
pub(crate) fn base_text(base: &Base) -> String {
    match base {
        Base::Scratch => "scratch".to_owned(),
        Base::Image(image) => image.clone(),
        Base::Stage(i) => format!("stage {i}"),
    }
}

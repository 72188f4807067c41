//! A stage's base mounted instead of unpacked (chroot mode, as root): the stage's rootfs is an
//! overlayfs mount whose lower dirs are the base image's layers (and the cache hits taken
//! before anything ran), each unpacked once into the kiln dir's layer trees and shared by every
//! stage and build after it. Unpacking is most of a cold stage's time on disks where each inode
//! costs half a millisecond to create; a rebuild from the same base creates none.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kiln_fs::overlay::{OverlayMount, TmpfsMount};
use kiln_fs::trees::{LayerTree, LayerTrees};

use crate::base::ImageLayer;
use crate::error::BuildError;
use crate::events::{BuildEvent, Phase};
use crate::shared::Shared;

use super::prepare::Materializer;

/// The overlay mounts of one build's stages, unmounted before the work dir they live in is
/// removed (removing a mounted tree would delete through the mount, then fail), and the layer
/// trees under them, held until then so that no prune removes a lower dir in use.
#[derive(Debug, Default)]
pub(crate) struct StageMounts {
    stages: Mutex<Vec<OverlayMount>>,
    scratch: Mutex<Option<TmpfsMount>>,
    trees: Mutex<Vec<LayerTree>>,
}

impl StageMounts {
    fn add(&self, mount: OverlayMount) {
        self.stages.lock().expect("stage mounts").push(mount);
    }

    /// Keeps `tree` held until the build's mounts go; returns its path.
    fn hold(&self, tree: LayerTree) -> PathBuf {
        let path = tree.path().to_path_buf();
        self.trees.lock().expect("held trees").push(tree);
        path
    }

    /// Unmounts every stage rootfs mounted so far and the scratch tmpfs, then lets go of the
    /// layer trees they stacked.
    pub(crate) fn unmount_all(&self) {
        self.stages.lock().expect("stage mounts").clear();
        self.scratch.lock().expect("scratch mount").take();
        self.trees.lock().expect("held trees").clear();
    }
}

/// The most a build's scratch tmpfs may hold: a quarter of the memory available when the build
/// starts, at most 1 GiB. What does not fit is written to disk instead.
fn scratch_size() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let size = (available_kib * 1024 / 4).min(1 << 30);
    (size >= 16 << 20).then_some(size)
}

/// What a refused overlay mount means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Overlayfs cannot be used here: said once, and the build unpacks from then on.
    Unusable,
    /// Only this mount is lost; the caller has another way (the snapshotter walks instead).
    Fallback,
}

/// A stage rootfs mounted as an overlay.
#[derive(Debug)]
pub(crate) struct Mounted {
    /// Where every write to the rootfs lands.
    pub(crate) upper: PathBuf,
    /// The lower dirs, topmost first.
    pub(crate) lowers: Vec<PathBuf>,
}

/// What a build needs to mount its stages' bases.
#[derive(Debug)]
pub(crate) struct BaseOverlay {
    trees: LayerTrees,
    mounts: Arc<StageMounts>,
    /// A tmpfs in the work dir for trees that live only while the build runs.
    scratch: Option<PathBuf>,
    /// Cleared at the first mount that fails (no overlayfs, a kiln dir overlayfs refuses as
    /// upper dir), so the build says so once and unpacks from then on.
    usable: AtomicBool,
}

impl BaseOverlay {
    /// The overlay setup for a build in chroot mode run as root with `--base-overlay` on, with
    /// its layer trees in `kiln_dir/layers`; `None` otherwise (with a note through `emit` when
    /// that store cannot be made).
    pub(crate) fn for_build(
        options: &crate::options::BuildOptions,
        mode: kiln_sandbox::Mode,
        mounts: &Arc<StageMounts>,
        work_dir: &Path,
        emit: &dyn Fn(BuildEvent),
    ) -> Option<BaseOverlay> {
        let wanted = options.snapshot.base_overlay
            && mode == kiln_sandbox::Mode::Chroot
            && rustix::process::geteuid().is_root();
        if !wanted {
            return None;
        }
        let trees = match LayerTrees::open(options.kiln_dir.join("layers")) {
            Ok(trees) => trees,
            Err(e) => {
                emit(BuildEvent::Note {
                    message: format!("{e}: bases are unpacked into each stage instead"),
                });
                return None;
            }
        };
        // Without a tmpfs (no memory to spare, mounting refused) scratch trees go to disk.
        let scratch = scratch_size().and_then(|size| {
            let dir = work_dir.join("scratch");
            std::fs::create_dir_all(&dir).ok()?;
            let mount = TmpfsMount::mount(&dir, size).ok()?;
            *mounts.scratch.lock().expect("scratch mount") = Some(mount);
            Some(dir)
        });
        Some(BaseOverlay {
            trees,
            mounts: Arc::clone(mounts),
            scratch,
            usable: AtomicBool::new(true),
        })
    }
}

impl<'a> Materializer<'a> {
    /// Pulls base `image` into the blob store, without unpacking it, when this stage can mount
    /// its base; `None` (nothing done) when it cannot: the caller pulls and unpacks as usual.
    pub(crate) fn pull_for_mount(
        &self,
        image: &str,
    ) -> Result<Option<crate::base::PulledImage>, BuildError> {
        let shared = self.shared;
        if self.mountable().is_none() {
            return Ok(None);
        }
        let pulled = shared
            .timed(Some(self.index), None, Phase::Pull, || {
                super::prepare::pull_to_store(shared, image)
            })
            .map_err(|e| BuildError::step(&self.at, format!("FROM {image}: {e}")))?;
        Ok(Some(pulled))
    }

    /// Mounts the stage's rootfs as the overlay of `base` (the base image's layers, in the blob
    /// store) and of as many of the pending cache hits as can be mounted too (the rest stay
    /// pending, to be applied through the mount). Returns false, with the rootfs untouched,
    /// when a base layer cannot be unpacked on its own or overlayfs refuses the mount: the
    /// caller unpacks the base instead.
    pub(crate) fn mount_layers(&mut self, base: &[ImageLayer]) -> Result<bool, BuildError> {
        let shared = self.shared;
        let Some(overlay) = self.mountable() else {
            return Ok(false);
        };
        if base.is_empty() {
            return Ok(false);
        }
        let cached = std::mem::take(&mut self.pending_cached);
        if let Some(cache) = shared.cache.as_ref() {
            for (entry, _) in &cached {
                cache.fetch_blob(&shared.runtime, &shared.blobs, entry)?;
            }
        }
        let layers: Vec<&ImageLayer> = base
            .iter()
            .chain(cached.iter().map(|(_, layer)| layer))
            .collect();
        let trees = shared.timed(Some(self.index), None, Phase::Unpack, || {
            overlay.trees_of(shared, &self.at, &layers)
        });
        shared.cancel.check()?;
        let mounted_hits = trees[base.len()..]
            .iter()
            .take_while(|tree| tree.is_some())
            .count();
        let mut lowers: Vec<PathBuf> = Vec::new();
        for tree in trees.into_iter().take(base.len() + mounted_hits) {
            match tree {
                Some(tree) => lowers.push(tree),
                None => {
                    self.pending_cached = cached;
                    return Ok(false);
                }
            }
        }
        lowers.reverse();
        let Some(upper) = overlay.mount_at(shared, self.rootfs, &lowers, Refused::Unusable)? else {
            self.pending_cached = cached;
            return Ok(false);
        };
        self.mounted = Some(Mounted { upper, lowers });
        self.pending_cached = cached.into_iter().skip(mounted_hits).collect();
        Ok(true)
    }

    /// Mounts the stage's lower dirs without its upper dir beside the rootfs: the tree as it
    /// was before any step, for the snapshotter to read old entries from as steps touch
    /// them. `None` when overlayfs refuses.
    pub(crate) fn mount_lower_view(
        &self,
        mounted: &Mounted,
    ) -> Result<Option<PathBuf>, BuildError> {
        let Some(overlay) = self.mountable() else {
            return Ok(None);
        };
        let name = self
            .rootfs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let view = self.rootfs.with_file_name(format!("{name}.lower-view"));
        std::fs::create_dir_all(&view).map_err(BuildError::io(&view))?;
        Ok(overlay
            .mount_at(self.shared, &view, &mounted.lowers, Refused::Fallback)?
            .map(|_| view))
    }

    /// The build's overlay setup, when this stage may use it.
    fn mountable(&self) -> Option<&'a BaseOverlay> {
        let shared: &'a Shared = self.shared;
        let overlay = shared.overlay.as_ref()?;
        (!self.in_place && overlay.usable.load(Ordering::Relaxed)).then_some(overlay)
    }
}

impl BaseOverlay {
    /// The trees of `layers` in the store, the missing ones unpacked side by side, a few at a
    /// time (each unpack has writer threads of its own); `None` for a layer that cannot be
    /// unpacked on its own, with a note saying why.
    fn trees_of(&self, shared: &Shared, at: &str, layers: &[&ImageLayer]) -> Vec<Option<PathBuf>> {
        let next = AtomicUsize::new(0);
        let found: Mutex<Vec<Option<PathBuf>>> = Mutex::new(vec![None; layers.len()]);
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(layers.len());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(layer) = layers.get(i) else { break };
                    let tree = self.layer_tree(shared, at, layer);
                    found.lock().expect("layer trees")[i] = tree;
                });
            }
        });
        found.into_inner().expect("layer trees")
    }

    /// The tree of `layer`, held until the build's mounts go.
    fn layer_tree(&self, shared: &Shared, at: &str, layer: &ImageLayer) -> Option<PathBuf> {
        let blob = shared.blobs.blob_path(&layer.descriptor.digest);
        let cancelled = || shared.cancel.is_cancelled();
        match (self.trees).get_or_unpack_until(
            &layer.diff_id,
            &blob,
            &layer.descriptor.digest,
            &cancelled,
        ) {
            Ok(tree) => Some(self.mounts.hold(tree)),
            Err(_) if cancelled() => None,
            Err(e) => {
                shared.emit(BuildEvent::Note {
                    message: format!(
                        "{at}: layer {} is applied onto the stage's tree, not mounted: {e}",
                        layer.diff_id
                    ),
                });
                None
            }
        }
    }

    /// Mounts `lowers` (topmost first) at `rootfs`, its upper and work dirs beside it, and
    /// returns the upper dir. `None` when overlayfs refuses (said once per build).
    fn mount_at(
        &self,
        shared: &Shared,
        rootfs: &Path,
        lowers: &[PathBuf],
        refused: Refused,
    ) -> Result<Option<PathBuf>, BuildError> {
        let name = rootfs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let beside = |suffix: &str| -> Result<PathBuf, BuildError> {
            let dir = rootfs.with_file_name(format!("{name}.{suffix}"));
            std::fs::create_dir_all(&dir).map_err(BuildError::io(&dir))?;
            Ok(dir)
        };
        let (upper, work) = (beside("upper")?, beside("overlay-work")?);
        std::fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(BuildError::io(&upper))?;
        match OverlayMount::mount(rootfs, lowers, &upper, &work) {
            Ok(mount) => {
                self.mounts.add(mount);
                Ok(Some(upper))
            }
            Err(_) if refused == Refused::Fallback => Ok(None),
            Err(e) => {
                if self.usable.swap(false, Ordering::Relaxed) {
                    shared.emit(BuildEvent::Note {
                        message: format!(
                            "overlayfs cannot mount stage trees under {} ({e}): bases are \
                             unpacked into each stage instead",
                            display_parent(rootfs)
                        ),
                    });
                }
                Ok(None)
            }
        }
    }
}

impl Shared {
    /// A directory on tmpfs for trees that only live while the build runs, when the build has
    /// one.
    pub(crate) fn scratch_dir(&self) -> Option<&Path> {
        self.overlay.as_ref()?.scratch.as_deref()
    }

    /// Mounts the image made of `layers` (bottom first, in the blob store) at `rootfs`, for a
    /// finished stage or an image that later steps only read; false, with `rootfs` untouched,
    /// when the build does not mount, a layer cannot stand alone or overlayfs refuses: the
    /// caller unpacks instead.
    pub(crate) fn mount_image_layers(
        &self,
        at: &str,
        rootfs: &Path,
        layers: &[ImageLayer],
    ) -> Result<bool, BuildError> {
        let Some(overlay) = self.overlay.as_ref() else {
            return Ok(false);
        };
        if layers.is_empty() || !overlay.usable.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let layers: Vec<&ImageLayer> = layers.iter().collect();
        let Some(mut lowers) = overlay
            .trees_of(self, at, &layers)
            .into_iter()
            .collect::<Option<Vec<PathBuf>>>()
        else {
            return Ok(false);
        };
        lowers.reverse();
        Ok(overlay
            .mount_at(self, rootfs, &lowers, Refused::Unusable)?
            .is_some())
    }
}

fn display_parent(path: &Path) -> String {
    path.parent().unwrap_or(path).display().to_string()
}

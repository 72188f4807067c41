//! A stage's base mounted instead of unpacked (chroot mode, as root): the stage's rootfs is an
//! overlayfs mount whose lower dirs are the base image's layers (and the cache hits taken
//! before anything ran), each unpacked once into the kiln dir's layer trees and shared by every
//! stage and build after it. Unpacking is most of a cold stage's time on disks where each inode
//! costs half a millisecond to create; a rebuild from the same base creates none.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_fs::overlay::{OverlayMount, TmpfsMount};
use kiln_fs::trees::{LayerTree, LayerTrees};

use kiln_fs::snapshot::{Index, Snapshotter};

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
    /// The tmpfs stages' upper dirs live on (`--upper-tmpfs`).
    uppers: Mutex<Option<TmpfsMount>>,
    trees: Mutex<Vec<LayerTree>>,
}

impl StageMounts {
    fn add(&self, mount: OverlayMount) {
        self.stages.lock().expect("stage mounts").push(mount);
    }

    /// Unmounts the overlay mounted at `target`, if any.
    fn remove(&self, target: &Path) {
        self.stages
            .lock()
            .expect("stage mounts")
            .retain(|mount| mount.target() != target);
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
        // After the overlays whose upper dirs it holds.
        self.uppers.lock().expect("uppers mount").take();
        self.trees.lock().expect("held trees").clear();
    }
}

/// The most a build's scratch tmpfs may hold: a quarter of the memory available when the build
/// starts (under the memory cgroup's limit too, see [`memory_available`]), at most 1 GiB. What
/// does not fit is written to disk instead.
fn scratch_size() -> Option<u64> {
    let size = (memory_available()? / 4).min(1 << 30);
    (size >= 16 << 20).then_some(size)
}

/// The memory this process may still use: `MemAvailable`, and when its memory cgroup has a
/// limit, the room left under it. Pages on tmpfs are charged to the cgroup that writes them, so
/// in a Pod with a memory limit the limit, not the node's free memory, is what a tmpfs may
/// take before the build is killed.
fn memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?
        * 1024;
    Some(match cgroup_room() {
        Some(room) => available.min(room),
        None => available,
    })
}

/// The room left under this process's memory cgroup limit (cgroup v2, else v1); `None` when
/// there is no limit or no cgroup to read. The cgroup's own directory is tried first, then the
/// hierarchy's root (a container without a cgroup namespace sees its own cgroup mounted there
/// while `/proc/self/cgroup` names the host's path).
fn cgroup_room() -> Option<u64> {
    let read =
        |path: &Path| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let path_of = |controller: &str| {
        cgroups.lines().find_map(|line| {
            let (_, rest) = line.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            (controllers.split(',').any(|c| c == controller)).then(|| path.to_owned())
        })
    };
    let v2 = Path::new("/sys/fs/cgroup");
    let v1 = Path::new("/sys/fs/cgroup/memory");
    let v2_dirs = path_of("").map(|p| v2.join(p.trim_start_matches('/')));
    for dir in v2_dirs.into_iter().chain([v2.to_path_buf()]) {
        // "max" when unlimited: no number, no bound.
        if let Some(limit) = read(&dir.join("memory.max")) {
            return Some(limit.saturating_sub(read(&dir.join("memory.current")).unwrap_or(0)));
        }
    }
    let v1_dirs = path_of("memory").map(|p| v1.join(p.trim_start_matches('/')));
    for dir in v1_dirs.into_iter().chain([v1.to_path_buf()]) {
        let Some(limit) = read(&dir.join("memory.limit_in_bytes")) else {
            continue;
        };
        // v1 says "no limit" with a number near i64::MAX, rounded down to a page.
        if limit < 1 << 60 {
            let used = read(&dir.join("memory.usage_in_bytes")).unwrap_or(0);
            return Some(limit.saturating_sub(used));
        }
    }
    None
}

/// The smallest upper-dir tmpfs `--upper-tmpfs=auto` mounts: a smaller one would send most
/// RUN steps that write enough files to matter to disk after all, each having run twice.
const UPPER_TMPFS_AUTO_MIN: u64 = 64 << 20;

/// The size of the tmpfs for the build's stage upper dirs, or `None` for upper dirs on disk.
/// `auto`: a quarter of the memory available, at most the cap, none when that is under 64 MiB
/// (the RUN steps' own programs need the rest; a stage that outgrows the tmpfs continues on
/// disk). `true`: the cap the flag gave, as given, else the default cap bounded the same way
/// (but never under 64 MiB). `--single-snapshot` keeps upper dirs on disk: its steps leave no
/// layers from which a stage moved to disk could be rebuilt.
fn upper_tmpfs_size(snapshot: &crate::options::SnapshotOptions) -> Option<u64> {
    use crate::options::{UpperTmpfs, UPPER_TMPFS_DEFAULT_CAP};
    if snapshot.single_snapshot {
        return None;
    }
    let cap = snapshot.upper_tmpfs_size.unwrap_or(UPPER_TMPFS_DEFAULT_CAP);
    let quarter = memory_available().map(|available| available / 4);
    match snapshot.upper_tmpfs {
        UpperTmpfs::Never => None,
        UpperTmpfs::Auto => {
            let size = quarter.map_or(0, |quarter| quarter.min(cap));
            (size >= UPPER_TMPFS_AUTO_MIN).then_some(size)
        }
        UpperTmpfs::Always if snapshot.upper_tmpfs_size.is_some() => Some(cap),
        UpperTmpfs::Always => {
            Some(quarter.map_or(cap, |quarter| quarter.clamp(UPPER_TMPFS_AUTO_MIN, cap)))
        }
    }
}

/// The tmpfs the build's stage upper dirs go on, one directory per stage.
#[derive(Debug)]
struct UpperTmpfsDir {
    path: PathBuf,
    /// Its size in bytes (the cap it was mounted with).
    size: u64,
}

/// How full a tmpfs is: the larger of its used fractions of bytes and of inodes, in
/// thousandths. `None` when it cannot be asked.
fn fullness(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    let part = |free: u64, total: u64| -> u64 {
        ((total - free.min(total)) * 1000)
            .checked_div(total)
            .unwrap_or(0)
    };
    Some(part(st.f_bfree, st.f_blocks).max(part(st.f_ffree, st.f_files)))
}

/// Past this fullness (thousandths) the upper-dir tmpfs counts as full: a step that fails
/// with it this full may have failed for want of room and runs again on disk, and a stage
/// moves to disk before its next step rather than start that step with a quarter left.
pub(crate) const UPPER_FULL: u64 = 750;

/// Watches how full the upper-dir tmpfs gets while a step runs. Sampled, not exact: a program
/// that fills the tmpfs and deletes what it wrote before it exits (dpkg rolls back a failed
/// unpack) leaves it empty again, so the fullness after a failure alone says too little.
#[derive(Debug)]
pub(crate) struct FullnessWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    sampler: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl FullnessWatch {
    fn start(path: &Path) -> FullnessWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(fullness(path).unwrap_or(0)));
        let sampler = {
            let (stop, peak, path) = (Arc::clone(&stop), Arc::clone(&peak), path.to_path_buf());
            // One statvfs every 2 ms: noise next to a step, and to go unseen a program would
            // have to write and delete a quarter of the tmpfs between two samples.
            std::thread::Builder::new()
                .name("upper-tmpfs-watch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(now) = fullness(&path) {
                            peak.fetch_max(now, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
                .ok()
        };
        FullnessWatch {
            stop,
            peak,
            sampler,
            path: path.to_path_buf(),
        }
    }

    /// Stops watching; whether the tmpfs was ever [`UPPER_FULL`] full while it watched.
    pub(crate) fn filled(mut self) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
        let last = fullness(&self.path).unwrap_or(0);
        self.peak.load(Ordering::Relaxed).max(last) >= UPPER_FULL
    }
}

impl Drop for FullnessWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a refused overlay mount means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Overlayfs cannot be used here: said once, and the build unpacks from then on.
    Unusable,
    /// Only this mount is lost; the caller has another way (the snapshotter walks instead).
    Fallback,
}

/// Where a mount's upper and work dirs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpperPlace {
    /// Beside the mount point, in the work dir on disk.
    Disk,
    /// On the build's upper-dir tmpfs when it has one (else on disk).
    Tmpfs,
}

/// A stage rootfs mounted as an overlay.
#[derive(Debug)]
pub(crate) struct Mounted {
    /// Where every write to the rootfs lands.
    pub(crate) upper: PathBuf,
    /// The lower dirs, topmost first.
    pub(crate) lowers: Vec<PathBuf>,
    /// Whether `upper` is on the build's upper-dir tmpfs.
    pub(crate) on_tmpfs: bool,
    /// The diff IDs of the cache hits mounted as lower dirs (above the base's), in step
    /// order: their files are in `lowers`, not in `upper`.
    pub(crate) mounted_hits: Vec<kiln_oci::Digest>,
}

/// What a build needs to mount its stages' bases.
#[derive(Debug)]
pub(crate) struct BaseOverlay {
    trees: LayerTrees,
    mounts: Arc<StageMounts>,
    /// A tmpfs in the work dir for trees that live only while the build runs.
    scratch: Option<PathBuf>,
    /// The tmpfs stage upper dirs go on (`--upper-tmpfs`), when the build has one.
    uppers: Option<UpperTmpfsDir>,
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
        let uppers = upper_tmpfs_size(&options.snapshot).and_then(|size| {
            let dir = work_dir.join("uppers");
            let mounted = std::fs::create_dir_all(&dir)
                .and_then(|()| TmpfsMount::mount_limited(&dir, size, upper_tmpfs_inodes(size)));
            match mounted {
                Ok(mount) => {
                    *mounts.uppers.lock().expect("uppers mount") = Some(mount);
                    Some(UpperTmpfsDir { path: dir, size })
                }
                Err(e) => {
                    if options.snapshot.upper_tmpfs == crate::options::UpperTmpfs::Always {
                        emit(BuildEvent::Warning {
                            message: format!(
                                "--upper-tmpfs=true: cannot mount a tmpfs at {}: {e}; stage \
                                 upper dirs stay on disk",
                                dir.display()
                            ),
                        });
                    }
                    None
                }
            }
        });
        Some(BaseOverlay {
            trees,
            mounts: Arc::clone(mounts),
            scratch,
            uppers,
            usable: AtomicBool::new(true),
        })
    }
}

/// The most inodes the upper-dir tmpfs may hold: one per 4 KiB of its size. Inodes and their
/// dentries (about 1 KiB of kernel memory each) are not counted against a tmpfs's size, so
/// without this bound a RUN creating millions of empty files could take far more memory than
/// the cap says; with it they take at most about a quarter more.
fn upper_tmpfs_inodes(size: u64) -> u64 {
    (size / 4096).max(1024)
}

/// Says the size `bytes` as `4 MiB`, `1.5 GiB`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.1} {unit}")
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
        let Some((upper, on_tmpfs)) = overlay.mount_at(
            shared,
            self.rootfs,
            &lowers,
            Refused::Unusable,
            UpperPlace::Tmpfs,
        )?
        else {
            self.pending_cached = cached;
            return Ok(false);
        };
        self.mounted = Some(Mounted {
            upper,
            lowers,
            on_tmpfs,
            mounted_hits: cached[..mounted_hits]
                .iter()
                .map(|(_, layer)| layer.diff_id.clone())
                .collect(),
        });
        self.pending_cached = cached.into_iter().skip(mounted_hits).collect();
        Ok(true)
    }

    /// Whether the stage's upper dir is on the build's upper-dir tmpfs.
    pub(crate) fn upper_on_tmpfs(&self) -> bool {
        self.mounted.as_ref().is_some_and(|m| m.on_tmpfs)
    }

    /// The cap of the upper-dir tmpfs, when the stage's upper dir is on it.
    pub(crate) fn upper_tmpfs_cap(&self) -> Option<u64> {
        self.shared
            .overlay
            .as_ref()
            .and_then(|o| o.uppers.as_ref())
            .filter(|_| self.upper_on_tmpfs())
            .map(|u| u.size)
    }

    /// Whether the stage's upper dir is on the tmpfs and that is [`UPPER_FULL`] full now.
    pub(crate) fn upper_tmpfs_filling(&self) -> bool {
        let uppers = self.shared.overlay.as_ref().and_then(|o| o.uppers.as_ref());
        match uppers {
            Some(uppers) if self.upper_on_tmpfs() => {
                fullness(&uppers.path).is_some_and(|f| f >= UPPER_FULL)
            }
            _ => false,
        }
    }

    /// Starts watching the upper-dir tmpfs, when the stage's upper dir is on it.
    pub(crate) fn watch_upper_tmpfs(&self) -> Option<FullnessWatch> {
        let uppers = self.shared.overlay.as_ref()?.uppers.as_ref()?;
        self.upper_on_tmpfs()
            .then(|| FullnessWatch::start(&uppers.path))
    }

    /// Moves the stage to disk: unmounts its overlay, mounts the same lower dirs again with an
    /// upper dir in the work dir on disk, applies `layers` (the layers of the stage's steps so
    /// far, bottom first, as in the image) through the new mount except those mounted as lower
    /// dirs, frees the tmpfs upper dir, and returns a snapshotter that follows the new upper
    /// dir (its index a walk of the tree as it now is) and a sandbox for it. The caller drops
    /// its snapshotter and sandbox first.
    ///
    /// The layers are the reliable record of the stage: the tmpfs upper dir also holds what a
    /// failed step wrote before it failed.
    pub(crate) fn spill_to_disk(
        &mut self,
        layers: &[ImageLayer],
    ) -> Result<(Snapshotter, Box<dyn kiln_sandbox::Sandbox>), BuildError> {
        let shared = self.shared;
        let overlay = shared
            .overlay
            .as_ref()
            .expect("a stage with an upper dir on tmpfs mounts through the build's overlay");
        let mounted = self
            .mounted
            .take()
            .expect("a stage with an upper dir on tmpfs is mounted");
        overlay.mounts.remove(self.rootfs);
        let Some((upper, on_tmpfs)) = overlay.mount_at(
            shared,
            self.rootfs,
            &mounted.lowers,
            Refused::Fallback,
            UpperPlace::Disk,
        )?
        else {
            return Err(BuildError::step(
                &self.at,
                format!(
                    "overlayfs refused to mount the stage at {} again with its upper dir on disk",
                    self.rootfs.display()
                ),
            ));
        };
        debug_assert!(!on_tmpfs);
        // The tmpfs upper dir and work dir of the old mount: their memory goes back.
        if let Some(old) = mounted.upper.parent().filter(|_| mounted.on_tmpfs) {
            let _ = std::fs::remove_dir_all(old);
        }
        let mut hits = mounted.mounted_hits.iter().peekable();
        let on_top: Vec<ImageLayer> = layers
            .iter()
            .filter(|layer| {
                if hits.peek() == Some(&&layer.diff_id) {
                    hits.next();
                    false
                } else {
                    true
                }
            })
            .cloned()
            .collect();
        self.mounted = Some(Mounted {
            upper: upper.clone(),
            lowers: mounted.lowers,
            on_tmpfs: false,
            mounted_hits: mounted.mounted_hits,
        });
        self.apply_layers(&on_top)?;
        let failed = |e| BuildError::image(format!("stage {}", self.index), e);
        let mut snapshotter =
            Snapshotter::new(self.rootfs, Index::new(), self.snapshot_options).map_err(failed)?;
        snapshotter
            .rescan()
            .and_then(|()| snapshotter.follow_upper_dir(&upper))
            .map_err(failed)?;
        let sandbox = kiln_sandbox::open(shared.mode, self.rootfs).map_err(|e| {
            BuildError::step(&self.at, format!("cannot prepare the RUN sandbox: {e}"))
        })?;
        Ok((snapshotter, sandbox))
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
        // The view must number inodes as the stage's mount does, so its upper dir is where
        // the stage's is: see `OverlayMount::mount`.
        let place = if mounted.on_tmpfs {
            UpperPlace::Tmpfs
        } else {
            UpperPlace::Disk
        };
        match overlay.mount_at(
            self.shared,
            &view,
            &mounted.lowers,
            Refused::Fallback,
            place,
        )? {
            Some((_, on_tmpfs)) if on_tmpfs == mounted.on_tmpfs => Ok(Some(view)),
            Some(_) => {
                overlay.mounts.remove(&view);
                Ok(None)
            }
            None => Ok(None),
        }
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

    /// Mounts `lowers` (topmost first) at `rootfs`, its upper and work dirs beside it (or on
    /// the upper-dir tmpfs, `place` permitting, in a directory named after the mount point),
    /// and returns the upper dir and whether it is on the tmpfs. `None` when overlayfs refuses
    /// (said once per build).
    fn mount_at(
        &self,
        shared: &Shared,
        rootfs: &Path,
        lowers: &[PathBuf],
        refused: Refused,
        place: UpperPlace,
    ) -> Result<Option<(PathBuf, bool)>, BuildError> {
        let name = rootfs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let made = |dir: PathBuf| -> Result<PathBuf, BuildError> {
            std::fs::create_dir_all(&dir).map_err(BuildError::io(&dir))?;
            Ok(dir)
        };
        let public = |upper: &Path| -> Result<(), BuildError> {
            std::fs::set_permissions(upper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(BuildError::io(upper))
        };
        if let (UpperPlace::Tmpfs, Some(uppers)) = (place, self.uppers.as_ref()) {
            let dir = uppers.path.join(&name);
            let (upper, work) = (made(dir.join("upper"))?, made(dir.join("work"))?);
            public(&upper)?;
            match OverlayMount::mount(rootfs, lowers, &upper, &work) {
                Ok(mount) => {
                    self.mounts.add(mount);
                    return Ok(Some((upper, true)));
                }
                // Whatever overlayfs has against this tmpfs, the disk may do.
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        let beside = |suffix: &str| made(rootfs.with_file_name(format!("{name}.{suffix}")));
        let (upper, work) = (beside("upper")?, beside("overlay-work")?);
        public(&upper)?;
        match OverlayMount::mount(rootfs, lowers, &upper, &work) {
            Ok(mount) => {
                self.mounts.add(mount);
                Ok(Some((upper, false)))
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
            .mount_at(self, rootfs, &lowers, Refused::Unusable, UpperPlace::Disk)?
            .is_some())
    }
}

fn display_parent(path: &Path) -> String {
    path.parent().unwrap_or(path).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::{human_size, upper_tmpfs_inodes, upper_tmpfs_size, UPPER_TMPFS_AUTO_MIN};
    use crate::options::{SnapshotOptions, UpperTmpfs, UPPER_TMPFS_DEFAULT_CAP};

    #[test]
    fn sizes_are_said_in_binary_units() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(4 << 20), "4 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(4 << 30), "4 GiB");
    }

    #[test]
    fn the_upper_tmpfs_size_follows_the_flags() {
        let with = |mode: UpperTmpfs, size: Option<u64>, single: bool| {
            upper_tmpfs_size(&SnapshotOptions {
                upper_tmpfs: mode,
                upper_tmpfs_size: size,
                single_snapshot: single,
                ..SnapshotOptions::default()
            })
        };
        assert_eq!(with(UpperTmpfs::Never, Some(1 << 30), false), None);
        // A cap given with `true` is taken as given, however small.
        assert_eq!(
            with(UpperTmpfs::Always, Some(4 << 20), false),
            Some(4 << 20)
        );
        // --single-snapshot leaves no layers to move a stage to disk with.
        assert_eq!(with(UpperTmpfs::Always, Some(4 << 20), true), None);
        assert_eq!(with(UpperTmpfs::Auto, None, true), None);
        let forced = with(UpperTmpfs::Always, None, false).unwrap();
        assert!((UPPER_TMPFS_AUTO_MIN..=UPPER_TMPFS_DEFAULT_CAP).contains(&forced));
        // `auto` never goes under its minimum, nor over the cap it is given.
        assert_eq!(with(UpperTmpfs::Auto, Some(16 << 20), false), None);
        if let Some(auto) = with(UpperTmpfs::Auto, Some(256 << 20), false) {
            assert!((UPPER_TMPFS_AUTO_MIN..=256 << 20).contains(&auto));
        }
    }

    #[test]
    fn inodes_are_bounded_by_the_size() {
        assert_eq!(upper_tmpfs_inodes(4 << 20), 1024);
        assert_eq!(upper_tmpfs_inodes(1 << 30), 262_144);
        assert_eq!(upper_tmpfs_inodes(64 << 10), 1024);
    }
}

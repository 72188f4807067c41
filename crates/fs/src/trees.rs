//! The layer tree store: each layer made once, on its own, into a tree named by its diff ID
//! (whiteouts in overlayfs's form), for [`crate::overlay::OverlayMount`] to stack as lower
//! dirs. Where the kernel mounts EROFS images from files, a tree is a layer image (a regular
//! file, see [`crate::erofs`] and [`crate::unpack::unpack_layer_image`]): making one writes
//! the tar once instead of creating every inode in it, and each holder mounts it read-only
//! under `.mounts/` for as long as it holds it. A layer an image cannot stand for (an entry
//! under a symlink the layer itself makes, a sparse file), or a store opened with
//! [`LayerTrees::directories_only`], gets a directory unpacked by
//! [`crate::unpack::unpack_layer_tree`] instead. One store serves every build that
//! shares a kiln dir, in any number of processes at once, and [`LayerTrees::prune`] removes the
//! trees nobody used for a while.
//!
//! Beside the trees, `.stamps/<name>` is both a tree's lock and its record of use:
//!
//! - a build holds a shared `flock` on it for as long as it mounts the tree (a [`LayerTree`]),
//!   and sets its mtime when it takes the tree and again when it lets go;
//! - unpacking holds it exclusively, so builds in other processes wait for that one unpack
//!   instead of each making a copy of its own (a Debian base is thousands of inodes);
//! - a prune takes it exclusively without waiting: a tree held or being made is skipped and
//!   reported, never removed. A tree removed is first renamed out of the store while the lock
//!   is held, and its stamp unlinked; a build that was waiting for the lock then finds its file
//!   unlinked, takes the new one and unpacks the tree again.
//!
//! A tree appears by an atomic rename once complete and leaves by one before it is deleted, so
//! no build ever mounts half of one.

use std::fs::{File, TryLockError};
use std::io::{self, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use kiln_oci::Digest;

use crate::erofs::ErofsMount;
use crate::resolve::{Root, RootError};
use crate::unpack::{unpack_layer_image, unpack_layer_tree, UnpackError};

/// Why a layer has no tree in the store, or the store could not be pruned.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The layer could not be unpacked on its own (it only makes sense on top of the layers
    /// below it) or is damaged; see [`unpack_layer_tree`].
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// The store could not be read or written.
    #[error("layer tree store {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A tree being unpacked could not be opened or cleared inside its root.
    #[error(transparent)]
    Root(#[from] RootError),
    /// The caller stopped the unpack ([`LayerTrees::get_or_unpack_until`]); the partial tree
    /// was deleted.
    #[error("unpacking was stopped")]
    Stopped,
}

/// Holds each tree's lock and record of use, apart from the trees so no tree name can be one.
const STAMPS: &str = ".stamps";
/// Where holders mount layer images: `.mounts/PID-N-NAME`.
const MOUNTS: &str = ".mounts";
/// Prefix of a tree being unpacked: `.unpacking-PID-N-NAME`.
const UNPACKING: &str = ".unpacking-";
/// Prefix of a tree a prune took out of the store and is deleting: `.removing-PID-NAME`.
const REMOVING: &str = ".removing-";
/// Held by a prune for its whole run, so two prunes never delete the same leftovers.
const PRUNE_LOCK: &str = ".prune.lock";
/// How long a build keeps asking for a tree whose lock others hold while it does not exist (a
/// tree deleted by hand under a running build) before it gives up with an error.
const LOCK_PATIENCE: Duration = Duration::from_secs(60);

/// Distinguishes the temporary trees of one process's concurrent unpacks.
static NEXT_TEMPORARY: AtomicU64 = AtomicU64::new(0);

/// Layers unpacked on their own, one directory each, named by diff ID, for overlayfs to stack;
/// see the [module docs](self) for how builds and prunes share it.
#[derive(Debug, Clone)]
pub struct LayerTrees {
    dir: PathBuf,
    /// Whether missing layers are made into images (else directories).
    images: bool,
}

/// A tree in the store, held for as long as this value lives: no prune removes it meanwhile.
/// Keep it at least as long as any mount that uses the tree as a lower dir. Dropping it records
/// the end of its use (the time prunes age the tree by).
#[derive(Debug)]
pub struct LayerTree {
    path: PathBuf,
    /// The tree in the store: `path` itself for a directory, the image file for an image.
    stored: PathBuf,
    /// The stamp, locked shared.
    stamp: File,
    /// The holder's own mount of a layer image, at `path`.
    mount: Option<ErofsMount>,
}

impl LayerTree {
    /// Where the tree is (a directory, or the mount of a layer image), to give overlayfs as a
    /// lower dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tree in the store (the image file, for a layer image): the same for every holder of
    /// one layer, where [`LayerTree::path`] of an image is each holder's own mount.
    pub fn stored(&self) -> &Path {
        &self.stored
    }
}

impl Drop for LayerTree {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take() {
            drop(mount);
            let _ = std::fs::remove_dir(&self.path);
        }
        // A stamp that cannot be touched only makes the tree look older to a prune, which
        // still cannot take it while a mount holds it.
        let _ = self.stamp.set_modified(SystemTime::now());
    }
}

/// One tree a prune removed, would remove, or kept because it is in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunedTree {
    /// The diff ID of the layer the tree holds.
    pub diff_id: Digest,
    /// How long before the prune the tree was last used.
    pub unused_for: Duration,
    /// Disk space its files take (each hard-linked inode once); 0 for a tree kept.
    pub bytes: u64,
}

/// What [`LayerTrees::prune`] did or, in a dry run, would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreePruneReport {
    /// The store pruned.
    pub dir: PathBuf,
    /// Nothing was changed: `removed` lists what a real run would remove.
    pub dry_run: bool,
    /// Trees unused for longer than the cutoff and removed, in name order.
    pub removed: Vec<PrunedTree>,
    /// Trees unused for longer than the cutoff by their stamps but held by a build (mounted, or
    /// being unpacked), so kept.
    pub in_use: Vec<PrunedTree>,
    /// How many trees were used more recently than the cutoff.
    pub kept: usize,
    /// How many half-made or half-deleted trees, left by builds and prunes that stopped early,
    /// were removed (would be, in a dry run).
    pub leftovers: usize,
    /// What could not be examined or removed: the path and the error, one line each.
    pub failed: Vec<String>,
}

/// Distinguishes one process's mounts of the same image.
static NEXT_MOUNT: AtomicU64 = AtomicU64::new(0);

impl LayerTree {
    /// Takes the tree at `tree` (held by `stamp`, shared): a directory as it is, an image
    /// mounted under `mounts`. `None` when nothing is there.
    fn take(tree: &Path, stamp: File, mounts: &Path) -> Result<Option<LayerTree>, TreeError> {
        let Ok(meta) = tree.symlink_metadata() else {
            return Ok(None);
        };
        // The time of taking the tree counts as a use too, so a prune that runs while a
        // long build holds it reports how recently it was taken.
        let _ = stamp.set_modified(SystemTime::now());
        if meta.is_dir() {
            return Ok(Some(LayerTree {
                path: tree.to_path_buf(),
                stored: tree.to_path_buf(),
                stamp,
                mount: None,
            }));
        }
        if !meta.is_file() {
            return Ok(None);
        }
        let name = tree.file_name().unwrap_or_default().to_string_lossy();
        let target = mounts.join(format!(
            "{}-{}-{name}",
            std::process::id(),
            NEXT_MOUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&target).map_err(io_error(&target))?;
        match ErofsMount::mount(tree, &target) {
            Ok(mount) => Ok(Some(LayerTree {
                path: target,
                stored: tree.to_path_buf(),
                stamp,
                mount: Some(mount),
            })),
            Err(source) => {
                let _ = std::fs::remove_dir(&target);
                Err(TreeError::Io {
                    path: tree.to_path_buf(),
                    source: io::Error::new(
                        source.kind(),
                        format!("mounting the layer image: {source}"),
                    ),
                })
            }
        }
    }
}

impl LayerTrees {
    /// The store in `dir`, created if missing. Missing layers will be made into layer images
    /// if this kernel mounts EROFS images from files (tried once per process, with a tiny image
    /// in `dir/.mounts`), else into directories. Temporary trees that builds killed while
    /// unpacking left behind are deleted, and so are the image mounts of killed builds.
    pub fn open(dir: impl Into<PathBuf>) -> Result<LayerTrees, TreeError> {
        let dir = dir.into();
        let stamps = dir.join(STAMPS);
        std::fs::create_dir_all(&stamps).map_err(io_error(&stamps))?;
        let mounts = dir.join(MOUNTS);
        std::fs::create_dir_all(&mounts).map_err(io_error(&mounts))?;
        let images = crate::erofs::file_mounts_supported(&mounts);
        let trees = LayerTrees { dir, images };
        trees.remove_abandoned();
        Ok(trees)
    }

    /// The same store, making missing layers into unpacked directories, never images (trees
    /// already made stay what they are).
    pub fn directories_only(mut self) -> LayerTrees {
        self.images = false;
        self
    }

    /// Whether missing layers are made into layer images.
    pub fn makes_images(&self) -> bool {
        self.images
    }

    /// Deletes the temporary trees (`.unpacking-PID-N-NAME`) of unpacks that stopped: their
    /// process is gone and nobody holds the tree's stamp (an unpack holds it exclusively until
    /// it is done, whatever pid namespace it runs in, so the lock is what makes this safe
    /// across Pods sharing a kiln dir; the pid only spares a live process's tree the check).
    fn remove_abandoned(&self) {
        // Image mounts of builds killed before they let go: detached and their directories
        // removed (a live process's mounts are its own).
        if let Ok(entries) = std::fs::read_dir(self.dir.join(MOUNTS)) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let pid = name
                    .split('-')
                    .next()
                    .and_then(|pid| pid.parse::<i32>().ok());
                if pid.is_some_and(|pid| !process_alive(pid)) {
                    let _ =
                        rustix::mount::unmount(entry.path(), rustix::mount::UnmountFlags::DETACH);
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(UNPACKING) else {
                continue;
            };
            let mut parts = rest.splitn(3, '-');
            let pid = parts.next().and_then(|pid| pid.parse::<i32>().ok());
            let tree_of = parts.nth(1).unwrap_or_default();
            if pid.is_none_or(process_alive) || tree_of.is_empty() {
                continue;
            }
            if let Ok(Some(_free)) = try_lock_exclusive(&self.stamp_path(tree_of)) {
                discard(&self.dir.join(&name));
            }
        }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the tree of the layer with `diff_id` is (or would be).
    pub fn path_of(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join(tree_name(diff_id))
    }

    /// The tree of the layer with `diff_id`, held until the returned value is dropped; unpacked
    /// from `blob` (whose digest is `digest`) if the store does not hold it yet, both digests
    /// verified while unpacking. When another build (in this process or another) is unpacking
    /// the same layer, this waits for its tree instead of making a second one. On error nothing
    /// is left in the store.
    pub fn get_or_unpack(
        &self,
        diff_id: &Digest,
        blob: &Path,
        digest: &Digest,
    ) -> Result<LayerTree, TreeError> {
        self.get_or_unpack_until(diff_id, blob, digest, &|| false)
    }

    /// [`LayerTrees::get_or_unpack`], giving up at the first read of the blob after `stop`
    /// returns true (a cancelled build): the half-unpacked tree is deleted and the error is
    /// [`TreeError::Stopped`].
    pub fn get_or_unpack_until(
        &self,
        diff_id: &Digest,
        blob: &Path,
        digest: &Digest,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<LayerTree, TreeError> {
        let name = tree_name(diff_id);
        let tree = self.dir.join(&name);
        let stamp_path = self.stamp_path(&name);
        let mut waited = Duration::ZERO;
        loop {
            // Waits only while someone holds the lock exclusively: an unpack or a prune.
            let stamp = lock_shared(&stamp_path)?;
            if let Some(held) = LayerTree::take(&tree, stamp, &self.dir.join(MOUNTS))? {
                return Ok(held);
            }
            let Some(stamp) = try_lock_exclusive(&stamp_path)? else {
                // Others hold it: one is unpacking (the next shared lock waits for it), or
                // several are where this build is. Give them a moment.
                if waited >= LOCK_PATIENCE {
                    return Err(TreeError::Io {
                        path: tree,
                        source: io::Error::other(format!(
                            "missing, and its lock {} has been held by others for {}s: was the tree deleted by hand while a build used it?",
                            stamp_path.display(),
                            LOCK_PATIENCE.as_secs()
                        )),
                    });
                }
                let pause = Duration::from_millis(10);
                std::thread::sleep(pause);
                waited += pause;
                continue;
            };
            if tree.symlink_metadata().is_err() {
                self.unpack(&name, &tree, blob, digest, diff_id, stop)?;
            }
            // Not atomic (flock drops the exclusive lock before taking the shared one), so a
            // prune may slip in between: check again that this is still the tree's stamp and
            // the tree is still there, else start over.
            stamp.lock_shared().map_err(io_error(&stamp_path))?;
            if is_linked(&stamp, &stamp_path) {
                if let Some(held) = LayerTree::take(&tree, stamp, &self.dir.join(MOUNTS))? {
                    return Ok(held);
                }
            }
        }
    }

    /// Makes the layer into a temporary image (or, when it cannot be one, a directory) and
    /// renames it to `tree`; the caller holds the tree's stamp exclusively.
    fn unpack(
        &self,
        name: &str,
        tree: &Path,
        blob: &Path,
        digest: &Digest,
        diff_id: &Digest,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), TreeError> {
        let temporary = self.dir.join(format!(
            "{UNPACKING}{}-{}-{name}",
            std::process::id(),
            NEXT_TEMPORARY.fetch_add(1, Ordering::Relaxed),
        ));
        if self.images {
            let made = (|| {
                let file = File::open(blob).map_err(io_error(blob))?;
                let reader = StopReader { inner: file, stop };
                unpack_layer_image(&temporary, BufReader::new(reader), digest, Some(diff_id))?;
                Ok::<_, TreeError>(())
            })()
            .map_err(|e| if stop() { TreeError::Stopped } else { e });
            match made {
                Ok(()) => {
                    let placed = std::fs::rename(&temporary, tree).map_err(io_error(tree));
                    if placed.is_err() {
                        discard(&temporary);
                    }
                    return placed;
                }
                // A layer an image cannot stand for may still unpack on its own.
                Err(TreeError::Unpack(UnpackError::InvalidEntry { .. })) => discard(&temporary),
                Err(e) => {
                    discard(&temporary);
                    return Err(e);
                }
            }
        }
        std::fs::create_dir(&temporary).map_err(io_error(&temporary))?;
        let unpacked = (|| {
            let root = Root::open(&temporary)?;
            let file = File::open(blob).map_err(io_error(blob))?;
            let reader = StopReader { inner: file, stop };
            unpack_layer_tree(&root, BufReader::new(reader), digest, Some(diff_id))?;
            Ok::<_, TreeError>(())
        })()
        .map_err(|e| if stop() { TreeError::Stopped } else { e });
        let placed = unpacked.and_then(|()| {
            std::fs::rename(&temporary, tree).map_err(|source| TreeError::Io {
                path: tree.to_path_buf(),
                source,
            })
        });
        if placed.is_err() {
            discard(&temporary);
        }
        placed
    }

    fn stamp_path(&self, name: &str) -> PathBuf {
        self.dir.join(STAMPS).join(name)
    }

    /// Removes the trees not used for `older_than` (by their stamps; a tree from before stamps
    /// existed is aged from when it was put in the store) that no build holds, and the
    /// leftovers of builds and prunes that stopped half-way. A tree held by a build is kept
    /// and reported in [`TreePruneReport::in_use`]; one removed is renamed out of the store
    /// first, so a build starting meanwhile unpacks it again rather than mounting half of it.
    /// With `dry_run` nothing changes and the report says what would be removed.
    ///
    /// Errors only when the store cannot be listed; a tree that cannot be examined or removed
    /// is a line in [`TreePruneReport::failed`] and the others are still pruned.
    pub fn prune(&self, older_than: Duration, dry_run: bool) -> Result<TreePruneReport, TreeError> {
        let prune_lock_path = self.dir.join(PRUNE_LOCK);
        let prune_lock = open_stamp(&prune_lock_path)?;
        prune_lock.lock().map_err(io_error(&prune_lock_path))?;
        let store = Root::open(&self.dir)?;
        let mut report = TreePruneReport {
            dir: self.dir.clone(),
            dry_run,
            removed: Vec::new(),
            in_use: Vec::new(),
            kept: 0,
            leftovers: 0,
            failed: Vec::new(),
        };
        let now = SystemTime::now();
        for entry in store.read_dir("")? {
            let Some(name) = entry.to_str() else { continue };
            if name.starts_with(REMOVING) {
                // Only prunes make these, and this one holds the prune lock: whoever made it
                // stopped before deleting it.
                self.remove_leftover(&store, name, dry_run, &mut report);
            } else if let Some(rest) = name.strip_prefix(UNPACKING) {
                let tree_of = rest.splitn(3, '-').nth(2).unwrap_or_default();
                // An unpack holds its tree's stamp exclusively until it is done (whatever pid
                // namespace it runs in): a stamp free to take means it stopped.
                let stamp_path = self.stamp_path(tree_of);
                match try_lock_exclusive(&stamp_path) {
                    Ok(Some(_free)) => self.remove_leftover(&store, name, dry_run, &mut report),
                    Ok(None) => {}
                    Err(e) => report.failed.push(e.to_string()),
                }
            } else if let Some(diff_id) = diff_id_of(name) {
                if let Err(e) = self.prune_tree(&store, name, diff_id, now, older_than, &mut report)
                {
                    report.failed.push(e.to_string());
                }
            }
        }
        if !dry_run {
            self.remove_stale_stamps(&mut report);
        }
        Ok(report)
    }

    /// Prunes one tree, if it is old enough and free.
    fn prune_tree(
        &self,
        store: &Root,
        name: &str,
        diff_id: Digest,
        now: SystemTime,
        older_than: Duration,
        report: &mut TreePruneReport,
    ) -> Result<(), TreeError> {
        let tree = self.dir.join(name);
        let stamp_path = self.stamp_path(name);
        let tree_meta = store.symlink_metadata(name)?;
        if !tree_meta.is_dir() && !tree_meta.is_file() {
            return Ok(());
        }
        if !stamp_path.exists() {
            // A tree from a kiln dir older than stamps: aged from when it was renamed into the
            // store (a rename sets the directory's ctime). A build making the stamp first wins.
            let made =
                SystemTime::UNIX_EPOCH + Duration::from_secs(tree_meta.ctime().max(0) as u64);
            match File::options()
                .write(true)
                .create_new(true)
                .open(&stamp_path)
            {
                Ok(stamp) => stamp.set_modified(made).map_err(io_error(&stamp_path))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error(&stamp_path)(e)),
            }
        }
        let last_use = |stamp: &File| -> Result<Duration, TreeError> {
            let used = stamp
                .metadata()
                .and_then(|m| m.modified())
                .map_err(io_error(&stamp_path))?;
            Ok(now.duration_since(used).unwrap_or(Duration::ZERO))
        };
        let stamp = open_stamp(&stamp_path)?;
        let unused_for = last_use(&stamp)?;
        if unused_for < older_than {
            report.kept += 1;
            return Ok(());
        }
        match stamp.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                report.in_use.push(PrunedTree {
                    diff_id,
                    unused_for,
                    bytes: 0,
                });
                return Ok(());
            }
            Err(TryLockError::Error(e)) => return Err(io_error(&stamp_path)(e)),
        }
        // A build may have used it and let go between the first look and the lock.
        let unused_for = last_use(&stamp)?;
        if unused_for < older_than {
            report.kept += 1;
            return Ok(());
        }
        if report.dry_run {
            drop(stamp);
            let bytes = disk_usage(&tree)?;
            report.removed.push(PrunedTree {
                diff_id,
                unused_for,
                bytes,
            });
            return Ok(());
        }
        let removing = format!("{REMOVING}{}-{name}", std::process::id());
        let aside = self.dir.join(&removing);
        std::fs::rename(&tree, &aside).map_err(io_error(&tree))?;
        // Unlinked while still locked: a build waiting for this lock finds its file gone and
        // starts over with a new stamp, and no tree.
        std::fs::remove_file(&stamp_path).map_err(io_error(&stamp_path))?;
        drop(stamp);
        let bytes = disk_usage(&aside)?;
        store.remove_all(&removing)?;
        report.removed.push(PrunedTree {
            diff_id,
            unused_for,
            bytes,
        });
        Ok(())
    }

    /// Removes a half-made or half-deleted tree (in a dry run, only counts it).
    fn remove_leftover(
        &self,
        store: &Root,
        name: &str,
        dry_run: bool,
        report: &mut TreePruneReport,
    ) {
        if !dry_run {
            if let Err(e) = store.remove_all(name) {
                report.failed.push(e.to_string());
                return;
            }
        }
        report.leftovers += 1;
    }

    /// Removes the stamps of trees that are gone (a tree deleted by hand, an unpack that
    /// failed) when nobody holds them.
    fn remove_stale_stamps(&self, report: &mut TreePruneReport) {
        let stamps = self.dir.join(STAMPS);
        let names = match Root::open(&stamps).and_then(|root| root.read_dir("")) {
            Ok(names) => names,
            Err(e) => {
                report.failed.push(e.to_string());
                return;
            }
        };
        for name in names {
            if self.dir.join(&name).symlink_metadata().is_ok() {
                continue;
            }
            let stamp_path = stamps.join(&name);
            if let Ok(Some(_free)) = try_lock_exclusive(&stamp_path) {
                if self.dir.join(&name).symlink_metadata().is_err() {
                    let _ = std::fs::remove_file(&stamp_path);
                }
            }
        }
    }
}

/// A tree's directory name: `ALGORITHM-HEX`.
fn tree_name(diff_id: &Digest) -> String {
    format!("{}-{}", diff_id.algorithm().name(), diff_id.hex())
}

/// The diff ID a directory name in the store stands for; `None` for anything else.
fn diff_id_of(name: &str) -> Option<Digest> {
    let (algorithm, hex) = name.split_once('-')?;
    format!("{algorithm}:{hex}").parse().ok()
}

/// Opens (creating) the stamp at `path` and takes a shared lock on it, waiting while someone
/// holds it exclusively. A prune unlinks a stamp while holding it, so a lock taken on a file
/// that is no longer the one at `path` guards nothing: it is dropped and the file now at `path`
/// locked instead.
fn lock_shared(path: &Path) -> Result<File, TreeError> {
    loop {
        let stamp = open_stamp(path)?;
        stamp.lock_shared().map_err(io_error(path))?;
        if is_linked(&stamp, path) {
            return Ok(stamp);
        }
    }
}

/// Like [`lock_shared`] for an exclusive lock, taken only if nobody holds any: `None` then.
fn try_lock_exclusive(path: &Path) -> Result<Option<File>, TreeError> {
    loop {
        let stamp = open_stamp(path)?;
        match stamp.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(io_error(path)(e)),
        }
        if is_linked(&stamp, path) {
            return Ok(Some(stamp));
        }
    }
}

fn open_stamp(path: &Path) -> Result<File, TreeError> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_error(path))
}

/// Whether the open `file` is still the one at `path`.
fn is_linked(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// The disk space a tree takes: an image's blocks, or a directory's files, each inode once,
/// without following symlinks.
fn disk_usage(tree: &Path) -> Result<u64, TreeError> {
    let meta = tree.symlink_metadata().map_err(io_error(tree))?;
    if meta.is_file() {
        return Ok(meta.blocks() * 512);
    }
    let root = &Root::open(tree)?;
    fn walk(
        root: &Root,
        dir: &Path,
        seen: &mut std::collections::HashSet<(u64, u64)>,
        total: &mut u64,
    ) -> Result<(), TreeError> {
        for name in root.read_dir(dir)? {
            let rel = dir.join(&name);
            let meta = root.symlink_metadata(&rel)?;
            if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            *total += meta.blocks() * 512;
            if meta.is_dir() {
                walk(root, &rel, seen, total)?;
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(root, Path::new(""), &mut Default::default(), &mut total)?;
    Ok(total)
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> TreeError {
    let path = path.to_path_buf();
    move |source| TreeError::Io { path, source }
}

/// Removes a tree this process made, through its root (a symlink in it is removed, never
/// followed); a tree that cannot be removed is left for the next prune, not fatal.
/// A reader that fails once `stop` says so, ending the unpack that reads it.
struct StopReader<'a, R> {
    inner: R,
    stop: &'a (dyn Fn() -> bool + Sync),
}

impl<R: io::Read> io::Read for StopReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if (self.stop)() {
            return Err(io::Error::other("unpacking was stopped"));
        }
        self.inner.read(buf)
    }
}

/// Whether a process with this id exists (EPERM: it does, but is someone else's).
pub fn process_alive(pid: i32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    matches!(
        rustix::process::test_kill_process(pid),
        Ok(()) | Err(rustix::io::Errno::PERM)
    )
}

fn discard(tree: &Path) {
    if tree.symlink_metadata().is_ok_and(|m| m.is_file()) {
        let _ = std::fs::remove_file(tree);
        return;
    }
    if let Ok(root) = Root::open(tree) {
        let _ = root.remove_contents();
    }
    let _ = std::fs::remove_dir(tree);
}

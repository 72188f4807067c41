//! Stage rootfs as overlayfs mounts over layers unpacked once each.
//!
//! Creating an inode costs far more than reading one on the disks builds run on, so a base
//! image unpacked into every stage's tree again is most of a cold stage's time. Instead each
//! layer is unpacked once, on its own, into a [`LayerTrees`] store keyed by its diff ID (whiteouts
//! in overlayfs's form, see [`crate::unpack::unpack_layer_tree`]), and a stage's rootfs is an
//! [`OverlayMount`] whose lower dirs are those trees and whose upper dir is the stage's own.
//! Seen through the mount, the tree is what applying the layers one on top of the other gives,
//! and everything that reads or writes it (steps, snapshots, layer writers) goes through the
//! mount point as through any directory. Lower dirs are never written: overlayfs copies a file
//! up before changing it, so any number of stages and builds can share one tree.
//!
//! Needs root (overlayfs mounts, `mknod` and `trusted.*` xattrs in the trees), and a kiln dir
//! on a filesystem overlayfs accepts as upper dir (not overlayfs itself, for example).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kiln_oci::Digest;
use rustix::fd::AsFd;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
};

use crate::resolve::{Root, RootError};
use crate::unpack::{unpack_layer_tree, UnpackError};

/// Why a layer has no tree in the store.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The layer could not be unpacked on its own (it only makes sense on top of the layers
    /// below it) or is damaged; see [`unpack_layer_tree`].
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// The store could not be written.
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

/// Layers unpacked on their own, one directory each, named by diff ID, for overlayfs to stack.
/// Shared by every build that uses the same kiln dir: a tree appears by an atomic rename once
/// complete, so a reader never sees half of one, and two builds unpacking the same layer at the
/// same time both end up using whichever tree was renamed first.
#[derive(Debug, Clone)]
pub struct LayerTrees {
    dir: PathBuf,
    /// One lock per layer being unpacked by this process, so that stages starting from the
    /// same base at the same time unpack it once and the others wait for that tree.
    in_flight: Arc<Mutex<HashMap<Digest, Arc<Mutex<()>>>>>,
}

/// Distinguishes the temporary trees of one process's concurrent unpacks.
static NEXT_TEMPORARY: AtomicU64 = AtomicU64::new(0);

impl LayerTrees {
    /// The store in `dir`, created if missing. Temporary trees that processes which no longer
    /// exist left behind (a build killed while unpacking) are deleted.
    pub fn open(dir: impl Into<PathBuf>) -> Result<LayerTrees, TreeError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| TreeError::Io {
            path: dir.clone(),
            source,
        })?;
        remove_abandoned(&dir);
        Ok(LayerTrees {
            dir,
            in_flight: Arc::default(),
        })
    }

    /// Where the tree of the layer with `diff_id` is (or would be).
    pub fn path_of(&self, diff_id: &Digest) -> PathBuf {
        self.dir
            .join(format!("{}-{}", diff_id.algorithm().name(), diff_id.hex()))
    }

    /// The tree of the layer with `diff_id`, unpacked from `blob` (whose digest is `digest`) if
    /// the store does not hold it yet. Both digests are verified while unpacking. On error
    /// nothing is left in the store.
    pub fn get_or_unpack(
        &self,
        diff_id: &Digest,
        blob: &Path,
        digest: &Digest,
    ) -> Result<PathBuf, TreeError> {
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
    ) -> Result<PathBuf, TreeError> {
        let tree = self.path_of(diff_id);
        if tree.is_dir() {
            return Ok(tree);
        }
        let layer_lock = Arc::clone(
            self.in_flight
                .lock()
                .expect("layer tree locks")
                .entry(diff_id.clone())
                .or_default(),
        );
        let _unpacking = layer_lock.lock().expect("layer tree lock");
        if tree.is_dir() {
            return Ok(tree);
        }
        let temporary = self.dir.join(format!(
            ".unpacking-{}-{}-{}",
            std::process::id(),
            NEXT_TEMPORARY.fetch_add(1, Ordering::Relaxed),
            diff_id.hex()
        ));
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TreeError::Io { path, source }
        };
        std::fs::create_dir(&temporary).map_err(io_error(&temporary))?;
        let unpacked = (|| {
            let root = Root::open(&temporary)?;
            let file = File::open(blob).map_err(io_error(blob))?;
            let reader = StopReader { inner: file, stop };
            unpack_layer_tree(&root, BufReader::new(reader), digest, Some(diff_id))?;
            Ok::<_, TreeError>(())
        })();
        if let Err(e) = unpacked {
            discard(&temporary);
            return Err(if stop() { TreeError::Stopped } else { e });
        }
        match std::fs::rename(&temporary, &tree) {
            Ok(()) => Ok(tree),
            // Another build finished the same layer first: use its tree.
            Err(_) if tree.is_dir() => {
                discard(&temporary);
                Ok(tree)
            }
            Err(source) => {
                discard(&temporary);
                Err(TreeError::Io { path: tree, source })
            }
        }
    }
}

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

/// Deletes the temporary trees (`.unpacking-PID-…`) of processes that are gone: a build
/// killed in the middle of an unpack leaves one, which nothing else would ever remove.
fn remove_abandoned(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(".unpacking-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            discard(&dir.join(&name));
        }
    }
}

/// Whether a process with this id exists (EPERM: it does, but is someone else's).
fn process_alive(pid: i32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    matches!(
        rustix::process::test_kill_process(pid),
        Ok(()) | Err(rustix::io::Errno::PERM)
    )
}

/// Removes a tree this process made, through its root (a symlink in it is removed, never
/// followed); a tree that cannot be removed is left for the kiln dir's owner, not fatal.
fn discard(tree: &Path) {
    if let Ok(root) = Root::open(tree) {
        let _ = root.remove_contents();
    }
    let _ = std::fs::remove_dir(tree);
}

/// An overlayfs mount of a stage's rootfs, unmounted (lazily, so a process still inside does
/// not keep it) when dropped.
#[derive(Debug)]
pub struct OverlayMount {
    target: PathBuf,
}

impl OverlayMount {
    /// Mounts at `target` an overlay of `lowers` (topmost first) under `upper`, with `work` as
    /// overlayfs's work dir (an empty directory on the same filesystem as `upper`). Lower dirs
    /// are given one by one (`lowerdir+`, Linux 6.8), so their number is not bounded by the
    /// size of one mount option string; older kernels get the classic joined option.
    pub fn mount(
        target: &Path,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
    ) -> io::Result<OverlayMount> {
        if lowers.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an overlay needs at least one lower dir",
            ));
        }
        match mount_with_fs_context(target, lowers, upper, work) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::ENOSYS)
                    || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                mount_classic(target, lowers, upper, work)?
            }
            Err(e) => return Err(e),
        }
        Ok(OverlayMount {
            target: target.to_path_buf(),
        })
    }

    /// Where the overlay is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.target, UnmountFlags::DETACH) {
            tracing::warn!("unmounting the overlay at {}: {e}", self.target.display());
        }
    }
}

/// A tmpfs mounted for scratch trees that only live while a build runs (a linked copy's files
/// before they become a layer): creating a file there costs microseconds, against half a
/// millisecond on the disks builds run on. Unmounted (lazily) when dropped.
#[derive(Debug)]
pub struct TmpfsMount {
    target: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of at most `size` bytes at `target` (an existing directory), readable by
    /// root only.
    pub fn mount(target: &Path, size: u64) -> io::Result<TmpfsMount> {
        let options = std::ffi::CString::new(format!("size={size},mode=0700"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        rustix::mount::mount(
            "tmpfs",
            target,
            "tmpfs",
            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
            options.as_c_str(),
        )?;
        Ok(TmpfsMount {
            target: target.to_path_buf(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.target, UnmountFlags::DETACH) {
            tracing::warn!("unmounting the tmpfs at {}: {e}", self.target.display());
        }
    }
}

fn mount_with_fs_context(
    target: &Path,
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
) -> io::Result<()> {
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for lower in lowers {
        rustix::mount::fsconfig_set_string(fs.as_fd(), "lowerdir+", lower.as_path())?;
    }
    rustix::mount::fsconfig_set_string(fs.as_fd(), "upperdir", upper)?;
    rustix::mount::fsconfig_set_string(fs.as_fd(), "workdir", work)?;
    rustix::mount::fsconfig_create(fs.as_fd())?;
    let mount = rustix::mount::fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::empty(),
    )?;
    rustix::mount::move_mount(
        mount.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

fn mount_classic(target: &Path, lowers: &[PathBuf], upper: &Path, work: &Path) -> io::Result<()> {
    let mut options = std::ffi::OsString::from("lowerdir=");
    for (i, lower) in lowers.iter().enumerate() {
        if i > 0 {
            options.push(":");
        }
        options.push(escape_option(lower)?);
    }
    options.push(",upperdir=");
    options.push(escape_option(upper)?);
    options.push(",workdir=");
    options.push(escape_option(work)?);
    let options =
        std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(options.as_os_str()))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in an overlay path"))?;
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        MountFlags::empty(),
        Some(options.as_c_str()),
    )?;
    Ok(())
}

/// A path as one value of the joined overlay options, where `:` and `,` separate values.
fn escape_option(path: &Path) -> io::Result<&std::ffi::OsStr> {
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if bytes.iter().any(|b| matches!(b, b':' | b',' | b'\\')) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: `:`, `,` or `\\` in an overlay path", path.display()),
        ));
    }
    Ok(path.as_os_str())
}

/// Whether `path` is on overlayfs. Birth times are no identity there: a copy-up gives a path a
/// new upper inode (and birth time) while its inode number stays.
pub fn is_overlay(path: &Path) -> bool {
    const OVERLAYFS_SUPER_MAGIC: u32 = 0x794c_7630;
    rustix::fs::statfs(path).is_ok_and(|fs| fs.f_type as u32 == OVERLAYFS_SUPER_MAGIC)
}

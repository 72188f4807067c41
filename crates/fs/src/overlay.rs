//! Stage rootfs as overlayfs mounts over layers unpacked once each.
//!
//! Creating an inode costs far more than reading one on the disks builds run on, so a base
//! image unpacked into every stage's tree again is most of a cold stage's time. Instead each
//! layer is unpacked once, on its own, into a [`crate::trees::LayerTrees`] store keyed by its diff ID
//! (whiteouts in overlayfs's form, see [`crate::unpack::unpack_layer_tree`]), and a stage's rootfs is an
//! [`OverlayMount`] whose lower dirs are those trees and whose upper dir is the stage's own.
//! Seen through the mount, the tree is what applying the layers one on top of the other gives,
//! and everything that reads or writes it (steps, snapshots, layer writers) goes through the
//! mount point as through any directory. Lower dirs are never written: overlayfs copies a file
//! up before changing it, so any number of stages and builds can share one tree.
//!
//! Needs root (overlayfs mounts, `mknod` and `trusted.*` xattrs in the trees), and a kiln dir
//! on a filesystem overlayfs accepts as upper dir (not overlayfs itself, for example).

use std::io;
use std::path::{Path, PathBuf};

use rustix::fd::AsFd;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags,
};

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
    ///
    /// Always with overlayfs's `xino=on`. When the lower dirs are other filesystems than the
    /// upper dir (layer images, an upper dir on tmpfs over trees on disk), overlayfs otherwise
    /// numbers directories itself and a file copied up takes the upper filesystem's inode
    /// number, so a snapshotter comparing inode numbers (a stage's old entries are read from a
    /// second mount of its lower dirs) would see a directory a step only wrote into as replaced
    /// and make it opaque in the layer. With it, inode numbers are the lower or upper inode's,
    /// tagged with its filesystem: the same in every mount of the same lower dirs, and kept
    /// across copy-up. On one filesystem overlayfs ignores it.
    ///
    /// Lower dirs from a [`crate::trees::LayerTrees`] store must stay held (their
    /// [`crate::trees::LayerTree`]s alive) until the mount is dropped, or a prune may remove
    /// them under it.
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
        let flags = rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV;
        Self::mount_with(target, format!("size={size},mode=0700"), flags)
    }

    /// Mounts a tmpfs of at most `size` bytes and `inodes` inodes at `target` (an existing
    /// directory), readable by root only, for overlay upper dirs. Inodes are not counted in a
    /// tmpfs's size (each takes about 1 KiB of kernel memory): bounding them bounds the memory
    /// a tree of many empty files takes. Without `nosuid` and `nodev`: the device nodes and
    /// set-user-ID programs a RUN step makes in an upper dir must work in later steps as
    /// they do with the upper dir on disk.
    pub fn mount_limited(target: &Path, size: u64, inodes: u64) -> io::Result<TmpfsMount> {
        let options = format!("size={size},nr_inodes={inodes},mode=0700");
        Self::mount_with(target, options, rustix::mount::MountFlags::empty())
    }

    fn mount_with(
        target: &Path,
        options: String,
        flags: rustix::mount::MountFlags,
    ) -> io::Result<TmpfsMount> {
        let options = std::ffi::CString::new(options)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        rustix::mount::mount("tmpfs", target, "tmpfs", flags, options.as_c_str())?;
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
    rustix::mount::fsconfig_set_string(fs.as_fd(), "xino", "on")?;
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
    options.push(",xino=on");
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

//! Reading the names in an overlayfs upper dir, for a snapshot that looks only where a step
//! can have written. Only names and types are read here: whatever the snapshot compares is
//! stat'ed through the mounted root, so overlayfs's own bookkeeping in the upper dir (whiteout
//! devices, its xattrs) never reaches a layer.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};

use super::ignore::IgnoreSet;
use super::index::{as_path, join_key, Key};
use super::walk;

/// What an upper dir holds, split by how the snapshot must look at it.
pub(super) struct Listing {
    /// Paths to stat one by one.
    pub(super) singles: Vec<Key>,
    /// Directories whose whole subtree must be walked through the root: opaque ones (their
    /// lower content is hidden) and ones the index does not know as directories (new, or
    /// replacing a file). Nothing below them is in `singles`.
    pub(super) subtrees: Vec<Key>,
}

/// Whether a path was a directory before the steps being snapshotted.
pub(super) type WasDirectory<'a> = &'a mut dyn FnMut(&Key) -> Result<bool, (PathBuf, io::Error)>;

/// Lists the upper dir at `upper`, leaving out ignored paths. With `was_directory`,
/// directories that are opaque or were not directories go to [`Listing::subtrees`] without
/// being read; without it every path is in [`Listing::singles`].
pub(super) fn list(
    upper: &Path,
    ignore: &IgnoreSet,
    mut was_directory: Option<WasDirectory<'_>>,
) -> Result<Listing, (PathBuf, io::Error)> {
    let root = walk::open_root(upper).map_err(|e| (PathBuf::new(), e))?;
    let mut listing = Listing {
        singles: Vec::new(),
        subtrees: Vec::new(),
    };
    let mut pending: Vec<Key> = vec![Vec::new()];
    while let Some(dir_key) = pending.pop() {
        let at = |e: io::Error| (as_path(&dir_key).to_path_buf(), e);
        let fd = walk::open_beneath(&root, as_path(&dir_key), OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(at)?;
        let mut dir = rustix::fs::Dir::new(fd).map_err(|e| at(e.into()))?;
        while let Some(dirent) = dir.read() {
            let dirent = dirent.map_err(|e| at(e.into()))?;
            let name: &CStr = dirent.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let key = join_key(&dir_key, bytes);
            if ignore.is_ignored_exact(&key) {
                continue;
            }
            let dirfd = dir.fd().map_err(|e| at(e.into()))?;
            let is_dir = match dirent.file_type() {
                FileType::Directory => true,
                FileType::Unknown => is_directory(dirfd.as_fd(), name)
                    .map_err(|e| (as_path(&key).to_path_buf(), e))?,
                _ => false,
            };
            if !is_dir {
                listing.singles.push(key);
                continue;
            }
            if let Some(was_directory) = was_directory.as_mut() {
                let known_dir = was_directory(&key)?;
                let opaque =
                    is_opaque(dirfd.as_fd(), name).map_err(|e| (as_path(&key).to_path_buf(), e))?;
                if opaque || !known_dir {
                    listing.subtrees.push(key);
                    continue;
                }
            }
            listing.singles.push(key.clone());
            pending.push(key);
        }
    }
    Ok(listing)
}

fn is_directory(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    let st = rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE)?;
    Ok(FileType::from_raw_mode(u32::from(st.stx_mode)) == FileType::Directory)
}

/// Whether overlayfs marked directory `name` opaque (its lower content hidden). Mounted by
/// root, overlayfs keeps the mark in the trusted namespace; an unprivileged mount
/// (`userxattr`) keeps it in the user namespace.
fn is_opaque(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for attr in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        let mut value = [0u8; 4];
        match rustix::fs::fgetxattr(&fd, attr, &mut value) {
            Ok(n) if n >= 1 && value[0] == b'y' => return Ok(true),
            Ok(_) => {}
            Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => {}
            Err(rustix::io::Errno::RANGE) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

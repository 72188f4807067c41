//! Copies of a file or tree on this machine that keep what `cp -a` keeps: file types (devices,
//! fifos and sockets included), modes with their setuid/setgid/sticky bits, owners, extended
//! attributes (file capabilities among them), access and modification times, and hard links
//! inside the tree. Symlinks are copied as links, never followed.
//!
//! Kiln needs such copies where a tree must be private to one user of it: a stage built
//! `FROM` another stage, the source of a read-write `RUN --mount=type=bind`, the first
//! contents of a cache mount seeded `from=`. Doing it here rather than with the `cp` on `PATH`
//! matters in-place, where `PATH` is the stage's own, which may have no `cp` at all (Kiln's
//! image has none, nor do distroless or scratch stages).
//!
//! Regular files are cloned (`FICLONE`, sharing extents on filesystems that can) or else copied
//! with `copy_file_range`, on several threads; the walk that creates directories, links and
//! special files is one thread, and directory metadata is applied last, deepest first, so that
//! filling a directory does not move its times and a read-only directory can still be filled.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags, CWD};

/// A copy that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("copying {}: {source}", path.display())]
pub struct CloneError {
    /// The path (source or destination) the failing operation was on.
    pub path: PathBuf,
    /// What failed.
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> CloneError + '_ {
    move |source| CloneError {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `from` to `to` as `cp -a from to` would when `to` does not exist. When `from` is a
/// directory and `to` an existing directory, `from`'s contents are copied into `to` (as
/// `cp -a from/. to`) and `to` takes `from`'s metadata. A destination entry that already exists
/// anywhere else is an error: nothing is overwritten.
pub fn clone_tree(from: &Path, to: &Path) -> Result<(), CloneError> {
    let top = fs::symlink_metadata(from).map_err(at(from))?;
    let mut plan = Plan::default();
    if top.is_dir() {
        match fs::symlink_metadata(to) {
            Ok(existing) if existing.is_dir() => {}
            Ok(_) => {
                return Err(CloneError {
                    path: to.to_path_buf(),
                    source: io::Error::from(io::ErrorKind::AlreadyExists),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => make_dir(to)?,
            Err(e) => return Err(at(to)(e)),
        }
        plan.dirs.push((from.to_path_buf(), to.to_path_buf(), top));
        plan.walk(from, to)?;
    } else {
        plan.entry(from.to_path_buf(), to.to_path_buf(), top)?;
    }
    plan.finish()
}

/// What is left to do once the walk has made the tree's shape.
#[derive(Default)]
struct Plan {
    /// Directories made, parents before children, with their sources' metadata.
    dirs: Vec<(PathBuf, PathBuf, Metadata)>,
    /// Regular files to copy.
    files: Vec<(PathBuf, PathBuf, Metadata)>,
    /// Further names of a file with several links: (the first copy, this name).
    links: Vec<(PathBuf, PathBuf)>,
    /// The first copy of each multiply linked source inode, by (device, inode).
    first_copy: HashMap<(u64, u64), PathBuf>,
}

impl Plan {
    fn walk(&mut self, from: &Path, to: &Path) -> Result<(), CloneError> {
        for child in fs::read_dir(from).map_err(at(from))? {
            let child = child.map_err(at(from))?;
            let source = child.path();
            let dest = to.join(child.file_name());
            let meta = fs::symlink_metadata(&source).map_err(at(&source))?;
            if meta.is_dir() {
                make_dir(&dest)?;
                self.dirs.push((source.clone(), dest.clone(), meta));
                self.walk(&source, &dest)?;
            } else {
                self.entry(source, dest, meta)?;
            }
        }
        Ok(())
    }

    /// Makes a non-directory entry now, or plans it when it is a regular file.
    fn entry(&mut self, source: PathBuf, dest: PathBuf, meta: Metadata) -> Result<(), CloneError> {
        let kind = meta.file_type();
        if kind.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = self.first_copy.get(&(meta.dev(), meta.ino())) {
                    self.links.push((first.clone(), dest));
                    return Ok(());
                }
                self.first_copy
                    .insert((meta.dev(), meta.ino()), dest.clone());
            }
            self.files.push((source, dest, meta));
            return Ok(());
        }
        if kind.is_symlink() {
            let target = fs::read_link(&source).map_err(at(&source))?;
            std::os::unix::fs::symlink(&target, &dest).map_err(at(&dest))?;
        } else {
            let file_type = FileType::from_raw_mode(meta.mode());
            rustix::fs::mknodat(
                CWD,
                &dest,
                file_type,
                Mode::from_raw_mode(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(|e| at(&dest)(e.into()))?;
        }
        apply_metadata(&source, &dest, &meta)
    }

    fn finish(self) -> Result<(), CloneError> {
        self.files
            .par_iter()
            .try_for_each(|(source, dest, meta)| copy_file(source, dest, meta))?;
        for (first, dest) in &self.links {
            fs::hard_link(first, dest).map_err(at(dest))?;
        }
        for (source, dest, meta) in self.dirs.iter().rev() {
            apply_metadata(source, dest, meta)?;
        }
        Ok(())
    }
}

/// A directory only its owner can enter, until its own metadata is applied at the end.
fn make_dir(path: &Path) -> Result<(), CloneError> {
    rustix::fs::mkdirat(CWD, path, Mode::from_raw_mode(0o700)).map_err(|e| at(path)(e.into()))
}

fn copy_file(source: &Path, dest: &Path, meta: &Metadata) -> Result<(), CloneError> {
    let mut input = File::open(source).map_err(at(source))?;
    let mut output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(at(dest))?;
    if rustix::fs::ioctl_ficlone(&output, &input).is_err() {
        io::copy(&mut input, &mut output).map_err(at(dest))?;
    }
    // Owner before mode (a chown clears setuid and setgid), and both before the xattrs (a
    // chown also drops security.capability).
    rustix::fs::fchown(
        &output,
        Some(rustix::fs::Uid::from_raw(meta.uid())),
        Some(rustix::fs::Gid::from_raw(meta.gid())),
    )
    .map_err(|e| at(dest)(e.into()))?;
    rustix::fs::fchmod(&output, Mode::from_raw_mode(meta.mode() & 0o7777))
        .map_err(|e| at(dest)(e.into()))?;
    for (name, value) in crate::snapshot::xattrs_of(source).map_err(at(source))? {
        rustix::fs::fsetxattr(&output, name.as_slice(), &value, XattrFlags::empty())
            .map_err(|e| at(dest)(e.into()))?;
    }
    rustix::fs::futimens(&output, &timestamps(meta)).map_err(|e| at(dest)(e.into()))
}

/// Owner, mode (not for symlinks, which have none of their own), xattrs and times of `meta`
/// on `dest`, without following a symlink.
fn apply_metadata(source: &Path, dest: &Path, meta: &Metadata) -> Result<(), CloneError> {
    std::os::unix::fs::lchown(dest, Some(meta.uid()), Some(meta.gid())).map_err(at(dest))?;
    let is_link = meta.file_type().is_symlink();
    if !is_link {
        rustix::fs::chmodat(
            CWD,
            dest,
            Mode::from_raw_mode(meta.mode() & 0o7777),
            AtFlags::empty(),
        )
        .map_err(|e| at(dest)(e.into()))?;
    }
    for (name, value) in crate::snapshot::xattrs_of(source).map_err(at(source))? {
        match rustix::fs::lsetxattr(dest, name.as_slice(), &value, XattrFlags::empty()) {
            Ok(()) => {}
            // A symlink takes no user.* attribute on Linux, so its source cannot have one
            // either; a filesystem without xattrs gets none, as with `cp -a`.
            Err(rustix::io::Errno::NOTSUP) | Err(rustix::io::Errno::PERM) if is_link => {}
            Err(e) => return Err(at(dest)(e.into())),
        }
    }
    rustix::fs::utimensat(CWD, dest, &timestamps(meta), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| at(dest)(e.into()))
}

fn timestamps(meta: &Metadata) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec() as _,
        },
        last_modification: Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec() as _,
        },
    }
}

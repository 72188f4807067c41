//! Contained path resolution: a [`Root`] is a directory handle that every path is resolved
//! against as if it were `/`, so that no symlink, `..` or absolute name found inside a rootfs can
//! reach a file outside it.
//!
//! Two strategies give the same semantics:
//! - [`Strategy::Openat2`]: the kernel's `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//!   (Linux 5.6+), one syscall per lookup.
//! - [`Strategy::Walk`]: a component-by-component walk in user space for kernels (or seccomp
//!   profiles) without `openat2`. Each component is opened with `O_PATH | O_NOFOLLOW`; a symlink
//!   found on the way is read and its target resolved relative to the root; `..` pops a stack of
//!   directory descriptors and is clamped at the root; at most [`MAX_SYMLINK_HOPS`] symlinks are
//!   followed per lookup, so loops end with an error.
//!
//! Semantics, whichever strategy: absolute paths and absolute symlink targets start at the root;
//! `..` never goes above the root; the final component is followed or not as each operation
//! says; magic links (`/proc/self/...`) are never followed. Operations that create or remove an
//! entry resolve its parent directory and then act on the final name with `*at` calls that do not
//! follow it, so a symlink planted at the destination is replaced or refused, never written
//! through.

mod walk;

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use self::walk::Walk;

/// How many symlinks one lookup may follow before it is treated as a loop (the kernel's limit).
pub const MAX_SYMLINK_HOPS: u32 = 40;

/// How many times an `openat2` lookup is retried when the kernel reports a concurrent rename
/// (`EAGAIN`) before giving up.
const OPENAT2_RETRIES: u32 = 32;

/// Why an operation on a path inside a [`Root`] failed. Paths in messages are relative to the
/// root, followed by the root itself, so a user can find the file.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// A system call failed.
    #[error("{op} {} (inside root {}): {source}", path.display(), root.display())]
    Io {
        /// What was being done, e.g. `"open"`, `"create directory"`.
        op: &'static str,
        /// The root directory.
        root: PathBuf,
        /// The path inside the root.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// More than [`MAX_SYMLINK_HOPS`] symlinks were met while resolving a path.
    #[error("resolve {} (inside root {}): more than {MAX_SYMLINK_HOPS} symlinks followed, probably a loop", path.display(), root.display())]
    SymlinkLoop {
        /// The root directory.
        root: PathBuf,
        /// The path inside the root.
        path: PathBuf,
    },
    /// The path cannot name the entry the operation needs (e.g. it ends in `..` or is empty
    /// where a file name is required).
    #[error("{} (inside root {}): {reason}", path.display(), root.display())]
    InvalidPath {
        /// The root directory.
        root: PathBuf,
        /// The path inside the root.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl RootError {
    /// The kind of the underlying I/O error, if this error came from a system call (`None` for
    /// symlink loops and invalid paths, which have their own variants).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            RootError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The raw OS error number of the underlying system call, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            RootError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the path (or one of its parents) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.io_kind() == Some(io::ErrorKind::NotFound)
    }
}

/// How a [`Root`] resolves paths. Both give the same results; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The kernel's `openat2` with `RESOLVE_IN_ROOT`.
    Openat2,
    /// A user-space walk, one component at a time.
    Walk,
}

impl Strategy {
    /// `Openat2` when this kernel (and any seccomp filter) allows it, otherwise `Walk`. Probed
    /// once per process.
    pub fn detect() -> Strategy {
        static DETECTED: OnceLock<Strategy> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let probe = rustix::fs::openat2(
                rustix::fs::CWD,
                "/",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            );
            match probe {
                Ok(_) => Strategy::Openat2,
                // ENOSYS on old kernels; EPERM where a container runtime's seccomp profile
                // predates openat2.
                Err(_) => Strategy::Walk,
            }
        })
    }
}

/// A directory's final entry, resolved inside a [`Root`]: the directory holding it, opened with
/// `O_PATH`, and its name there. Acting on `(dir, name)` with `*at` system calls and
/// `AT_SYMLINK_NOFOLLOW` cannot leave the root.
#[derive(Debug)]
pub struct ParentDir {
    dir: OwnedFd,
    name: OsString,
}

impl ParentDir {
    /// The directory that holds the entry (an `O_PATH` descriptor).
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The entry's name inside [`dir`](Self::dir): one path component, never `.` or `..`.
    pub fn name(&self) -> &OsStr {
        &self.name
    }
}

/// A directory treated as `/` for every path resolved through it. See the module documentation
/// for the guarantees.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    strategy: Strategy,
}

impl Root {
    /// Opens `path` (which must be a directory) as a root, using [`Strategy::detect`].
    pub fn open(path: impl AsRef<Path>) -> Result<Root, RootError> {
        Self::open_with(path, Strategy::detect())
    }

    /// Opens `path` as a root with an explicit strategy (tests use this to exercise the walk on
    /// kernels that have `openat2`).
    pub fn open_with(path: impl AsRef<Path>, strategy: Strategy) -> Result<Root, RootError> {
        let path = path.as_ref().to_path_buf();
        let fd = rustix::fs::open(
            &path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| RootError::Io {
            op: "open root directory",
            root: path.clone(),
            path: PathBuf::from("/"),
            source: e.into(),
        })?;
        Ok(Root { fd, path, strategy })
    }

    /// The root directory as given to [`open`](Self::open).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The root directory's own `O_PATH` descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `rel` for reading, following symlinks inside the root.
    pub fn open_file(&self, rel: impl AsRef<Path>) -> Result<File, RootError> {
        let rel = rel.as_ref();
        self.open_raw(rel, OFlags::RDONLY | OFlags::CLOEXEC, true, "open")
            .map(File::from)
    }

    /// Opens the directory `rel` for reading (e.g. to list it), following symlinks inside the root.
    pub fn open_dir(&self, rel: impl AsRef<Path>) -> Result<File, RootError> {
        let rel = rel.as_ref();
        self.open_raw(
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            true,
            "open directory",
        )
        .map(File::from)
    }

    /// An `O_PATH` descriptor for `rel`; the final component is followed only if `follow_last`.
    pub fn open_path(
        &self,
        rel: impl AsRef<Path>,
        follow_last: bool,
    ) -> Result<OwnedFd, RootError> {
        self.open_raw(
            rel.as_ref(),
            OFlags::PATH | OFlags::CLOEXEC,
            follow_last,
            "open",
        )
    }

    /// Creates (or truncates) the regular file `rel` for writing. The parent is resolved inside
    /// the root; a symlink at `rel` itself is refused (`ELOOP`), not followed.
    pub fn create(&self, rel: impl AsRef<Path>, mode: u32) -> Result<File, RootError> {
        self.create_flags(rel.as_ref(), mode, OFlags::TRUNC)
    }

    /// Creates the regular file `rel`, failing if anything already exists there.
    pub fn create_new(&self, rel: impl AsRef<Path>, mode: u32) -> Result<File, RootError> {
        self.create_flags(rel.as_ref(), mode, OFlags::EXCL)
    }

    fn create_flags(&self, rel: &Path, mode: u32, extra: OFlags) -> Result<File, RootError> {
        let parent = self.resolve_parent(rel)?;
        rustix::fs::openat(
            &parent.dir,
            &parent.name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | extra,
            Mode::from_raw_mode(mode),
        )
        .map(File::from)
        .map_err(|e| self.io_err("create", rel, e))
    }

    /// Creates `rel` and any missing parents as directories with `mode` (before umask), following
    /// symlinks inside the root, and returns an `O_PATH` descriptor for it.
    pub fn mkdir_all(&self, rel: impl AsRef<Path>, mode: u32) -> Result<OwnedFd, RootError> {
        let rel = rel.as_ref();
        let (dir, leaf) = self.walk(rel, true, Some(Mode::from_raw_mode(mode)))?;
        let fd = match leaf {
            None => dir,
            Some(name) => rustix::fs::openat(
                &dir,
                &name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.io_err("create directory", rel, e))?,
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io_err("stat", rel, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(self.io_err("create directory", rel, Errno::NOTDIR));
        }
        Ok(fd)
    }

    /// Metadata of `rel` itself (a symlink is not followed).
    pub fn symlink_metadata(&self, rel: impl AsRef<Path>) -> Result<Metadata, RootError> {
        let rel = rel.as_ref();
        let fd = self.open_path(rel, false)?;
        File::from(fd)
            .metadata()
            .map_err(|e| self.io_err_std("stat", rel, e))
    }

    /// Metadata of what `rel` resolves to, following symlinks inside the root.
    pub fn metadata(&self, rel: impl AsRef<Path>) -> Result<Metadata, RootError> {
        let rel = rel.as_ref();
        let fd = self.open_path(rel, true)?;
        File::from(fd)
            .metadata()
            .map_err(|e| self.io_err_std("stat", rel, e))
    }

    /// The target of the symlink `rel`, as stored (not resolved).
    pub fn read_link(&self, rel: impl AsRef<Path>) -> Result<PathBuf, RootError> {
        let rel = rel.as_ref();
        let parent = self.resolve_parent(rel)?;
        rustix::fs::readlinkat(&parent.dir, &parent.name, Vec::new())
            .map(|target| PathBuf::from(OsString::from_vec(target.into_bytes())))
            .map_err(|e| self.io_err("read link", rel, e))
    }

    /// Creates a symlink at `rel` pointing to `target` (stored verbatim; it is only ever resolved
    /// inside the root).
    pub fn symlink(
        &self,
        target: impl AsRef<Path>,
        rel: impl AsRef<Path>,
    ) -> Result<(), RootError> {
        let rel = rel.as_ref();
        let parent = self.resolve_parent(rel)?;
        rustix::fs::symlinkat(target.as_ref(), &parent.dir, &parent.name)
            .map_err(|e| self.io_err("create symlink", rel, e))
    }

    /// Creates `new` as a hard link to `existing`; both are resolved inside the root and a
    /// symlink at `existing` is linked itself, not followed.
    pub fn hard_link(
        &self,
        existing: impl AsRef<Path>,
        new: impl AsRef<Path>,
    ) -> Result<(), RootError> {
        let (existing, new) = (existing.as_ref(), new.as_ref());
        let from = self.resolve_parent(existing)?;
        let to = self.resolve_parent(new)?;
        rustix::fs::linkat(&from.dir, &from.name, &to.dir, &to.name, AtFlags::empty())
            .map_err(|e| self.io_err("create hard link", new, e))
    }

    /// Removes `rel` (recursively if it is a directory) without following a symlink at `rel`.
    /// Returns whether something was removed.
    pub fn remove_all(&self, rel: impl AsRef<Path>) -> Result<bool, RootError> {
        let rel = rel.as_ref();
        let parent = match self.resolve_parent(rel) {
            Ok(p) => p,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        };
        remove_entry(parent.dir(), parent.name()).map_err(|e| self.io_err_std("remove", rel, e))
    }

    /// Where `rel` leads inside the root: the relative path with every symlink on the way
    /// followed inside the root (the final component too when `follow_last`), and no `.`,
    /// `..` or symlink among its directories. From the first component that does not exist
    /// on, the rest of `rel` is appended as written (nothing below a missing directory can be
    /// a symlink), so the result also names where a missing entry would be created. Callers
    /// that read or write a tree by the names a user wrote (COPY sources and destinations,
    /// mount targets) use it to know which entry they really touch.
    pub fn resolve(&self, rel: impl AsRef<Path>, follow_last: bool) -> Result<PathBuf, RootError> {
        let mut trail = Vec::new();
        let (_dir, leaf) = self.walk_inner(rel.as_ref(), follow_last, Walk::Lenient, &mut trail)?;
        let mut resolved: PathBuf = trail.iter().collect();
        if let Some(leaf) = leaf {
            resolved.push(leaf);
        }
        Ok(resolved)
    }

    /// Removes the file, symlink or *empty* directory `rel` (a final symlink is removed, not
    /// followed). Unlike [`remove_all`](Self::remove_all) it never takes anything else with
    /// it, for callers that must not delete what someone else put in a directory.
    pub fn remove(&self, rel: impl AsRef<Path>) -> Result<(), RootError> {
        let rel = rel.as_ref();
        let parent = self.resolve_parent(rel)?;
        let st = rustix::fs::statat(&parent.dir, &parent.name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err("stat", rel, e))?;
        let flags = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(&parent.dir, &parent.name, flags)
            .map_err(|e| self.io_err("remove", rel, e))
    }

    /// Removes everything inside the root, keeping the root directory itself: a symlink in
    /// it is removed, never followed.
    pub fn remove_contents(&self) -> Result<(), RootError> {
        for name in self.read_dir("")? {
            self.remove_all(&name)?;
        }
        Ok(())
    }

    /// The names in the directory `rel` (symlinks on the way followed inside the root),
    /// without `.` and `..`, sorted bytewise so that every walk of a tree is deterministic.
    pub fn read_dir(&self, rel: impl AsRef<Path>) -> Result<Vec<OsString>, RootError> {
        let rel = rel.as_ref();
        let dir = self.open_raw(
            rel,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            true,
            "list",
        )?;
        let mut names = list_dir(dir.as_fd()).map_err(|e| self.io_err_std("list", rel, e))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }

    /// The directory `rel` (symlinks followed inside this root) as a root of its own, for
    /// work that must treat it as `/` (an archive extracted into a destination directory).
    pub fn subroot(&self, rel: impl AsRef<Path>) -> Result<Root, RootError> {
        let rel = rel.as_ref();
        let fd = self.open_raw(
            rel,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            true,
            "open directory",
        )?;
        Ok(Root {
            fd,
            path: self.path.join(rel),
            strategy: self.strategy,
        })
    }

    /// The host path of what `rel` resolves to, for the few kernel interfaces that take a
    /// path and no descriptor (a mount source or target). Resolution happens here, inside the
    /// root; the caller must use the path before anything can change the tree.
    pub fn host_path(
        &self,
        rel: impl AsRef<Path>,
        follow_last: bool,
    ) -> Result<PathBuf, RootError> {
        let rel = rel.as_ref();
        let fd = self.open_path(rel, follow_last)?;
        let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
        std::fs::read_link(&link).map_err(|e| self.io_err_std("locate", rel, e))
    }

    /// Creates the special file `rel` (a FIFO, character or block device) with `mode`'s
    /// permission bits exactly (the umask is put right afterwards); the parent is resolved
    /// inside the root and nothing existing at `rel` is followed.
    pub fn make_node(
        &self,
        rel: impl AsRef<Path>,
        kind: FileType,
        mode: u32,
        device: u64,
    ) -> Result<(), RootError> {
        let rel = rel.as_ref();
        let parent = self.resolve_parent(rel)?;
        rustix::fs::mknodat(
            &parent.dir,
            &parent.name,
            kind,
            Mode::from_raw_mode(mode & 0o7777),
            device,
        )
        .map_err(|e| self.io_err("create special file", rel, e))?;
        self.set_mode(rel, mode & 0o7777)
    }

    /// Sets the owner of `rel` itself (a final symlink is not followed: its own owner changes).
    pub fn set_owner(&self, rel: impl AsRef<Path>, uid: u32, gid: u32) -> Result<(), RootError> {
        let rel = rel.as_ref();
        let (dir, name) = self.final_entry(rel)?;
        rustix::fs::chownat(
            &dir,
            &name,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io_err("chown", rel, e))
    }

    /// Sets the permission bits (with setuid, setgid and sticky) of `rel` itself. A symlink's
    /// mode cannot be set on Linux and `chmod` would follow it, possibly out of the root, so a
    /// final symlink is refused.
    pub fn set_mode(&self, rel: impl AsRef<Path>, mode: u32) -> Result<(), RootError> {
        let rel = rel.as_ref();
        let (dir, name) = self.final_entry(rel)?;
        let st = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err("stat", rel, e))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(RootError::InvalidPath {
                root: self.path.clone(),
                path: rel.to_path_buf(),
                reason: "a symlink has no mode of its own to set",
            });
        }
        rustix::fs::chmodat(&dir, &name, Mode::from_raw_mode(mode), AtFlags::empty())
            .map_err(|e| self.io_err("chmod", rel, e))
    }

    /// Sets the access and modification times of `rel` itself (a final symlink is not
    /// followed).
    pub fn set_times(
        &self,
        rel: impl AsRef<Path>,
        accessed: rustix::fs::Timespec,
        modified: rustix::fs::Timespec,
    ) -> Result<(), RootError> {
        let rel = rel.as_ref();
        let (dir, name) = self.final_entry(rel)?;
        let times = rustix::fs::Timestamps {
            last_access: accessed,
            last_modification: modified,
        };
        rustix::fs::utimensat(&dir, &name, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err("set times of", rel, e))
    }

    /// The directory holding `rel`'s final entry and the entry's name; for the root itself,
    /// the root and `.`.
    fn final_entry(&self, rel: &Path) -> Result<(OwnedFd, OsString), RootError> {
        if rel
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::CurDir))
        {
            let root = rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)
                .map_err(|e| self.io_err("open root of", rel, e))?;
            return Ok((root, OsString::from(".")));
        }
        let parent = self.resolve_parent(rel)?;
        Ok((parent.dir, parent.name))
    }

    /// Resolves every component of `rel` but the last inside the root (following symlinks) and
    /// returns the directory and the final name. `rel` must end in a normal name.
    pub fn resolve_parent(&self, rel: impl AsRef<Path>) -> Result<ParentDir, RootError> {
        let rel = rel.as_ref();
        let (parent, name) = split_leaf(rel).ok_or_else(|| RootError::InvalidPath {
            root: self.path.clone(),
            path: rel.to_path_buf(),
            reason: "the path must end in a file name (not empty, `.` or `..`)",
        })?;
        let dir = self.open_raw(
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            true,
            "resolve parent of",
        )?;
        Ok(ParentDir {
            dir,
            name: name.to_os_string(),
        })
    }

    /// Opens `rel` with `flags`, resolving inside the root.
    fn open_raw(
        &self,
        rel: &Path,
        flags: OFlags,
        follow_last: bool,
        op: &'static str,
    ) -> Result<OwnedFd, RootError> {
        let flags = if follow_last {
            flags
        } else {
            flags | OFlags::NOFOLLOW
        };
        match self.strategy {
            Strategy::Openat2 => {
                let target: &Path = if rel.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    rel
                };
                let mut attempts = 0;
                loop {
                    match rustix::fs::openat2(
                        &self.fd,
                        target,
                        flags,
                        Mode::empty(),
                        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
                    ) {
                        Ok(fd) => return Ok(fd),
                        Err(Errno::AGAIN) if attempts < OPENAT2_RETRIES => attempts += 1,
                        // Every caller either follows the last component or opens it with
                        // O_PATH, so ELOOP can only mean too many symlinks.
                        Err(Errno::LOOP) => {
                            return Err(RootError::SymlinkLoop {
                                root: self.path.clone(),
                                path: rel.to_path_buf(),
                            })
                        }
                        Err(e) => return Err(self.io_err(op, rel, e)),
                    }
                }
            }
            Strategy::Walk => {
                let (dir, leaf) = self.walk(rel, follow_last, None)?;
                let name: &OsStr = leaf.as_deref().unwrap_or(OsStr::new("."));
                rustix::fs::openat(&dir, name, flags | OFlags::NOFOLLOW, Mode::empty())
                    .map_err(|e| self.io_err(op, rel, e))
            }
        }
    }

    fn io_err(&self, op: &'static str, rel: &Path, e: Errno) -> RootError {
        self.io_err_std(op, rel, e.into())
    }

    fn io_err_std(&self, op: &'static str, rel: &Path, source: io::Error) -> RootError {
        RootError::Io {
            op,
            root: self.path.clone(),
            path: rel.to_path_buf(),
            source,
        }
    }
}

/// Splits `rel` into its parent and final normal component.
fn split_leaf(rel: &Path) -> Option<(&Path, &OsStr)> {
    match rel.components().next_back() {
        Some(Component::Normal(name)) => Some((rel.parent().unwrap_or(Path::new("")), name)),
        _ => None,
    }
}

/// Removes `name` in `dir` without following it; directories are emptied first. Returns
/// whether anything existed.
pub(crate) fn remove_entry(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let child = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        for entry in list_dir(child.as_fd())? {
            remove_entry(child.as_fd(), &entry)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(true)
}

/// The names in a directory (without `.` and `..`), read fully before the caller changes it.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut reader = rustix::fs::Dir::new(fd)?;
    let mut names = Vec::new();
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::{symlink, MetadataExt};

    fn both(f: impl Fn(Strategy)) {
        f(Strategy::Walk);
        if Strategy::detect() == Strategy::Openat2 {
            f(Strategy::Openat2);
        }
    }

    /// A tempdir holding `root/` and a canary file `outside` next to it.
    fn setup() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(tmp.path().join("outside"), b"canary").unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/inside"), b"inside").unwrap();
        (tmp, root)
    }

    fn read(root: &Root, rel: &str) -> Result<String, RootError> {
        let mut s = String::new();
        root.open_file(rel)?.read_to_string(&mut s).unwrap();
        Ok(s)
    }

    #[test]
    fn dotdot_and_absolute_symlinks_stay_inside() {
        both(|strategy| {
            let (_tmp, dir) = setup();
            symlink("../../outside", dir.join("up")).unwrap();
            symlink("/etc", dir.join("abs")).unwrap();
            symlink("/../../../etc/inside", dir.join("absfile")).unwrap();
            let root = Root::open_with(&dir, strategy).unwrap();
            assert!(
                read(&root, "up").unwrap_err().is_not_found(),
                "{strategy:?}"
            );
            assert!(read(&root, "../outside").unwrap_err().is_not_found());
            assert_eq!(read(&root, "abs/inside").unwrap(), "inside");
            assert_eq!(read(&root, "absfile").unwrap(), "inside");
            assert_eq!(read(&root, "/../etc/../etc/inside").unwrap(), "inside");
        });
    }

    #[test]
    fn symlink_loops_end_with_an_error() {
        both(|strategy| {
            let (_tmp, dir) = setup();
            symlink("b", dir.join("a")).unwrap();
            symlink("a", dir.join("b")).unwrap();
            symlink("self/x", dir.join("self")).unwrap();
            let root = Root::open_with(&dir, strategy).unwrap();
            assert!(matches!(
                read(&root, "a"),
                Err(RootError::SymlinkLoop { .. })
            ));
            assert!(matches!(
                read(&root, "self/x"),
                Err(RootError::SymlinkLoop { .. })
            ));
        });
    }

    #[test]
    fn create_never_writes_through_a_final_symlink() {
        both(|strategy| {
            let (tmp, dir) = setup();
            symlink(tmp.path().join("outside"), dir.join("evil")).unwrap();
            let root = Root::open_with(&dir, strategy).unwrap();
            assert!(root.create("evil", 0o644).is_err());
            // The parent is resolved inside the root: "/etc" here is root/etc.
            symlink("/etc", dir.join("etclink")).unwrap();
            root.create("etclink/new", 0o644)
                .unwrap()
                .write_all(b"x")
                .unwrap();
            assert_eq!(std::fs::read(dir.join("etc/new")).unwrap(), b"x");
            assert_eq!(
                std::fs::read(tmp.path().join("outside")).unwrap(),
                b"canary"
            );
        });
    }

    #[test]
    fn mkdir_all_follows_symlinks_inside_the_root() {
        both(|strategy| {
            let (tmp, dir) = setup();
            symlink("../../../", dir.join("up")).unwrap();
            let root = Root::open_with(&dir, strategy).unwrap();
            root.mkdir_all("up/made/deep", 0o755).unwrap();
            assert!(dir.join("made/deep").is_dir());
            assert!(!tmp.path().join("made").exists());
            assert!(root.mkdir_all("etc/inside/x", 0o755).is_err());
        });
    }

    #[test]
    fn remove_all_does_not_follow_and_reports_absence() {
        both(|strategy| {
            let (tmp, dir) = setup();
            symlink(tmp.path(), dir.join("link")).unwrap();
            let root = Root::open_with(&dir, strategy).unwrap();
            assert!(root.remove_all("link").unwrap());
            assert!(tmp.path().join("outside").exists());
            assert!(root.remove_all("etc").unwrap());
            assert!(!dir.join("etc").exists());
            assert!(!root.remove_all("etc").unwrap());
        });
    }

    #[test]
    fn metadata_and_links() {
        both(|strategy| {
            let (_tmp, dir) = setup();
            let root = Root::open_with(&dir, strategy).unwrap();
            root.symlink("/etc/inside", "l").unwrap();
            assert_eq!(root.read_link("l").unwrap(), Path::new("/etc/inside"));
            assert!(root.symlink_metadata("l").unwrap().file_type().is_symlink());
            assert!(root.metadata("l").unwrap().is_file());
            root.hard_link("etc/inside", "h").unwrap();
            assert_eq!(std::fs::read(dir.join("h")).unwrap(), b"inside");
            assert!(root.metadata("").unwrap().is_dir());
            assert!(root.resolve_parent("etc/..").is_err());
        });
    }

    #[test]
    fn resolve_names_the_entry_reached_inside_the_root() {
        both(|strategy| {
            let (tmp, dir) = setup();
            symlink("/etc", dir.join("abs")).unwrap();
            symlink("../../../etc/inside", dir.join("climb")).unwrap();
            symlink(tmp.path().join("outside"), dir.join("host")).unwrap();
            let root = Root::open_with(&dir, strategy).unwrap();
            assert_eq!(
                root.resolve("abs/inside", true).unwrap(),
                Path::new("etc/inside")
            );
            assert_eq!(
                root.resolve("climb", true).unwrap(),
                Path::new("etc/inside")
            );
            assert_eq!(root.resolve("climb", false).unwrap(), Path::new("climb"));
            assert_eq!(root.resolve("abs/new", true).unwrap(), Path::new("etc/new"));
            assert_eq!(root.resolve("/", true).unwrap(), Path::new(""));
            // The host file the link names is looked for inside the root, where it is not.
            let host = root.resolve("host", true).unwrap();
            assert_eq!(Path::new("/").join(&host), tmp.path().join("outside"));
            assert!(root.symlink_metadata(&host).unwrap_err().is_not_found());
            assert_eq!(
                root.resolve("abs/missing/../x/y", true).unwrap(),
                Path::new("etc/x/y")
            );
            assert!(
                root.resolve("etc/inside/x", true).is_err(),
                "a file is no directory"
            );
            root.symlink("etc", "dir").unwrap();
            root.remove("dir").unwrap();
            assert!(
                root.metadata("etc/inside").is_ok(),
                "the link went, not its target"
            );
            assert!(
                root.remove("etc").is_err(),
                "a directory with entries stays"
            );
        });
    }

    #[test]
    fn listing_owner_mode_and_times_stay_inside_the_root() {
        both(|strategy| {
            let (tmp, dir) = setup();
            std::fs::write(dir.join("etc/b"), b"b").unwrap();
            symlink(tmp.path().join("outside"), dir.join("etc/evil")).unwrap();
            symlink("/", dir.join("top")).unwrap();
            let root = Root::open_with(&dir, strategy).unwrap();
            let names = root.read_dir("top/etc").unwrap();
            assert_eq!(names, ["b", "evil", "inside"].map(OsString::from));
            assert!(root.set_mode("etc/evil", 0o600).is_err());
            root.set_owner("etc/evil", 7, 8).unwrap();
            let outside = std::fs::metadata(tmp.path().join("outside")).unwrap();
            assert_eq!(outside.uid(), 0, "chown followed a link out of the root");
            root.set_mode("etc/b", 0o4711).unwrap();
            let zero = rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            root.set_times("etc/evil", zero, zero).unwrap();
            root.set_times("", zero, zero).unwrap();
            assert_eq!(
                std::fs::metadata(dir.join("etc/b")).unwrap().mode() & 0o7777,
                0o4711
            );
            assert_ne!(outside.mtime(), 0);
            assert_eq!(std::fs::metadata(&dir).unwrap().mtime(), 0);
            let sub = root.subroot("top/etc").unwrap();
            assert_eq!(sub.read_dir("/../").unwrap().len(), 3);
            assert_eq!(sub.host_path("b", true).unwrap(), dir.join("etc/b"));
        });
    }
}

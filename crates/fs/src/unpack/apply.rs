//! Applying tar entries, one at a time, to a [`Root`]. Reading an entry's metadata is in
//! `meta`, whiteouts and opaque directories in `whiteout`.

pub(super) mod meta;
mod whiteout;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::hash::BuildHasher;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_oci::Digest;
use rustix::fd::{AsFd, BorrowedFd};
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;

use self::meta::{read_meta, EntryMeta};
use super::name::{self, Special};
use super::pool::{
    create_exclusive, set_owner_and_mode, FileJob, FileOpError, WritePool, MAX_QUEUED_FILE,
};
use super::{SkippedEntry, UnpackError, UnpackEvent};
use crate::resolve::{remove_entry, ParentDir, Root, RootError};

/// Copy buffer for file contents: large enough for few syscalls, small enough to not matter.
const COPY_BUFFER: usize = 256 * 1024;

/// Why applying the tar stopped: the stream failed (reported with the compressed offset by the
/// caller), or an entry failed (already a complete error).
pub(crate) enum Failure {
    Stream(io::Error),
    Entry(UnpackError),
}

/// What went wrong inside one entry, before the entry name and layer are attached.
pub(super) enum OpError {
    Root(RootError),
    Stream(io::Error),
    Invalid(String),
}

impl From<RootError> for OpError {
    fn from(e: RootError) -> Self {
        OpError::Root(e)
    }
}

/// State of one layer's unpack.
pub(crate) struct Applier<'r, 'o> {
    root: &'r Root,
    layer: &'r Digest,
    on_event: Option<&'o mut dyn FnMut(UnpackEvent<'_>)>,
    /// Paths (relative, cleaned) whose entries, whiteouts and opaque markers are not applied.
    skip: Option<&'o dyn Fn(&Path) -> bool>,
    /// Keyed hashes of every path this layer wrote (and their parents), so opaque directories
    /// and whiteouts spare this layer's own entries. Hashes rather than paths keep memory at a
    /// few bytes per entry.
    this_layer: HashSet<u64>,
    keys: RandomState,
    /// Directory times to set once everything under them is written.
    dir_times: HashMap<PathBuf, Timestamps>,
    skipped: Vec<SkippedEntry>,
    entries: u64,
    buf: Vec<u8>,
    /// Worker threads for small regular files, started at the first one.
    pool: Option<WritePool>,
    pool_started: bool,
    /// Whiteouts and opaque markers are recorded the way overlayfs reads them (a 0/0 character
    /// device, a `trusted.overlay.opaque` xattr) instead of removing anything: the root holds
    /// this layer alone and becomes an overlay lower dir (see [`super::unpack_layer_tree`]).
    pub(super) overlay: bool,
}

impl<'r, 'o> Applier<'r, 'o> {
    pub(crate) fn new(
        root: &'r Root,
        layer: &'r Digest,
        on_event: Option<&'o mut dyn FnMut(UnpackEvent<'_>)>,
        skip: Option<&'o dyn Fn(&Path) -> bool>,
    ) -> Self {
        Applier {
            root,
            layer,
            on_event,
            skip,
            this_layer: HashSet::new(),
            keys: RandomState::new(),
            dir_times: HashMap::new(),
            skipped: Vec::new(),
            entries: 0,
            buf: vec![0; COPY_BUFFER],
            pool: None,
            pool_started: false,
            overlay: false,
        }
    }

    /// Applies every entry of `archive`.
    pub(crate) fn apply_archive<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
    ) -> Result<(), Failure> {
        for entry in archive.entries().map_err(Failure::Stream)? {
            let mut entry = entry.map_err(Failure::Stream)?;
            self.apply_entry(&mut entry)?;
        }
        Ok(())
    }

    /// Sets directory times (now that all contents are written) and reports directories.
    pub(crate) fn finish(mut self) -> Result<(u64, Vec<SkippedEntry>), UnpackError> {
        if let Err(e) = self.drain_pool() {
            let entry = match &e {
                OpError::Root(RootError::Io { path, .. }) => path.to_string_lossy().into_owned(),
                _ => String::new(),
            };
            return Err(match e {
                OpError::Root(source) => UnpackError::Apply {
                    layer: self.layer.clone(),
                    entry,
                    source: Box::new(source),
                },
                OpError::Stream(e) => UnpackError::Apply {
                    layer: self.layer.clone(),
                    entry,
                    source: Box::new(self.io_err_std("write", Path::new(""), e)),
                },
                OpError::Invalid(reason) => UnpackError::InvalidEntry {
                    layer: self.layer.clone(),
                    entry,
                    reason,
                },
            });
        }
        self.pool = None;
        let dir_times = std::mem::take(&mut self.dir_times);
        for (path, times) in &dir_times {
            let shown = path.to_string_lossy();
            let set = if path.as_os_str().is_empty() {
                rustix::fs::utimensat(self.root.as_fd(), ".", times, AtFlags::empty())
                    .map_err(|e| self.io_err("set times of", path, e))
            } else {
                match self.root.resolve_parent(path) {
                    // Replaced or removed later in this layer: nothing to date.
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => Err(e),
                    Ok(parent) => rustix::fs::utimensat(
                        parent.dir(),
                        parent.name(),
                        times,
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| self.io_err("set times of", path, e)),
                }
            };
            let set = match set {
                // Removed later in this layer (e.g. by an opaque marker): nothing to date.
                Err(e) if e.is_not_found() => continue,
                other => other,
            };
            set.map_err(|source| UnpackError::Apply {
                layer: self.layer.clone(),
                entry: shown.to_string(),
                source: Box::new(source),
            })?;
            if self.on_event.is_some() {
                let metadata =
                    self.root
                        .symlink_metadata(path)
                        .map_err(|source| UnpackError::Apply {
                            layer: self.layer.clone(),
                            entry: shown.to_string(),
                            source: Box::new(source),
                        })?;
                self.emit(UnpackEvent::Written {
                    path,
                    metadata: &metadata,
                });
            }
        }
        Ok((self.entries, self.skipped))
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), Failure> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let entry_type = entry.header().entry_type();
        if entry_type.is_pax_global_extensions() {
            // Global PAX records carry no per-file metadata Kiln applies.
            return Ok(());
        }
        let path = name::clean_name(&raw).map_err(|r| self.invalid(&shown, r))?;
        let skip = self.skip;
        let skipped = |p: &Path| skip.is_some_and(|skip| skip(p));
        let result = match name::classify(&path).map_err(|r| self.invalid(&shown, r))? {
            Special::AufsMeta => return Ok(()),
            Special::Opaque { dir } if skipped(dir) => return Ok(()),
            Special::Opaque { dir } => {
                let dir = dir.to_path_buf();
                self.opaque(&dir)
            }
            Special::Whiteout { target } if skipped(&target) => return Ok(()),
            Special::Whiteout { target } => self.whiteout(&target),
            Special::None if skipped(&path) => return Ok(()),
            Special::None => self.apply_file(&path, entry),
        };
        match result {
            Ok(()) => {
                self.entries += 1;
                Ok(())
            }
            Err(OpError::Stream(e)) => Err(Failure::Stream(e)),
            Err(OpError::Invalid(reason)) => Err(self.invalid(&shown, &reason)),
            Err(OpError::Root(source)) => Err(Failure::Entry(UnpackError::Apply {
                layer: self.layer.clone(),
                entry: shown,
                source: Box::new(source),
            })),
        }
    }

    fn apply_file<R: Read>(
        &mut self,
        path: &Path,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), OpError> {
        let meta = read_meta(entry)?;
        let entry_type = entry.header().entry_type();
        if path.as_os_str().is_empty() && !entry_type.is_dir() {
            return Err(OpError::Invalid(
                "only a directory may stand for the root".into(),
            ));
        }
        self.mark(path);
        use tar::EntryType as T;
        match entry_type {
            T::Directory => self.directory(path, &meta),
            T::Regular | T::Continuous | T::GNUSparse => self.regular(path, &meta, entry),
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.symlink(path, &target, &meta)
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.hard_link(path, &target)
            }
            T::Char | T::Block | T::Fifo => self.node(path, entry_type, &meta),
            other => {
                self.skip(
                    path,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                );
                Ok(())
            }
        }
    }

    fn regular<R: Read>(
        &mut self,
        path: &Path,
        meta: &EntryMeta,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), OpError> {
        let parent = self.parent(path)?;
        self.clear(path, &parent, false)?;
        let size = entry.size();
        if meta.xattrs.is_empty() && size <= MAX_QUEUED_FILE && self.start_pool() {
            return self.queue_regular(path, parent, meta, entry);
        }
        let mut file = create_exclusive(&parent).map_err(|e| self.file_op_error(path, e))?;
        let mut remaining = size;
        while remaining > 0 {
            let want = remaining.min(self.buf.len() as u64) as usize;
            let n = match entry.read(&mut self.buf[..want]) {
                Ok(0) => return Err(truncated(path, remaining, size)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(OpError::Stream(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| self.io_err_std("write", path, e))?;
            remaining -= n as u64;
        }
        set_owner_and_mode(&file, meta.uid, meta.gid, meta.mode)
            .map_err(|e| self.file_op_error(path, e))?;
        self.set_xattrs(path, XattrTarget::Fd(file.as_fd()), &meta.xattrs)?;
        rustix::fs::futimens(&file, &meta.times)
            .map_err(|e| self.io_err("set times of", path, e))?;
        self.emit_written(path, &file)
    }

    /// Reads a small file's content from the stream and hands the writing to the pool.
    fn queue_regular<R: Read>(
        &mut self,
        path: &Path,
        parent: ParentDir,
        meta: &EntryMeta,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), OpError> {
        let size = entry.size();
        let mut content = Vec::with_capacity(size as usize);
        let got = (&mut *entry)
            .take(size)
            .read_to_end(&mut content)
            .map_err(OpError::Stream)? as u64;
        if got < size {
            return Err(truncated(path, size - got, size));
        }
        let job = FileJob {
            path: path.to_path_buf(),
            parent,
            content,
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            times: meta.times.clone(),
            want_metadata: self.on_event.is_some(),
        };
        let pool = self.pool.as_mut().expect("checked by the caller");
        pool.submit(job, &mut report_written(&mut self.on_event))
            .map_err(OpError::Root)
    }

    /// Waits for every queued file: called before anything that could touch one of them.
    fn drain_pool(&mut self) -> Result<(), OpError> {
        let Some(pool) = self.pool.as_mut() else {
            return Ok(());
        };
        pool.drain(&mut report_written(&mut self.on_event))
            .map_err(OpError::Root)
    }

    /// Whether the pool runs, starting it at the first call.
    fn start_pool(&mut self) -> bool {
        if !self.pool_started {
            self.pool_started = true;
            self.pool = WritePool::start(self.root.path());
        }
        self.pool.is_some()
    }

    fn pool_busy(&self) -> bool {
        self.pool.as_ref().is_some_and(WritePool::busy)
    }

    fn directory(&mut self, path: &Path, meta: &EntryMeta) -> Result<(), OpError> {
        let dir = if path.as_os_str().is_empty() {
            self.root.open_dir("")?
        } else {
            let parent = self.parent(path)?;
            if !self.clear(path, &parent, true)? {
                rustix::fs::mkdirat(parent.dir(), parent.name(), Mode::from_raw_mode(0o700))
                    .map_err(|e| self.io_err("create directory", path, e))?;
            }
            File::from(
                rustix::fs::openat(
                    parent.dir(),
                    parent.name(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.io_err("open directory", path, e))?,
            )
        };
        rustix::fs::fchown(&dir, Some(uid(meta.uid)), Some(gid(meta.gid)))
            .map_err(|e| self.io_err("change owner of", path, e))?;
        rustix::fs::fchmod(&dir, Mode::from_bits_retain(meta.mode))
            .map_err(|e| self.io_err("change mode of", path, e))?;
        self.set_xattrs(path, XattrTarget::Fd(dir.as_fd()), &meta.xattrs)?;
        self.dir_times
            .insert(path.to_path_buf(), meta.times.clone());
        Ok(())
    }

    fn symlink(&mut self, path: &Path, target: &[u8], meta: &EntryMeta) -> Result<(), OpError> {
        if target.is_empty() {
            return Err(OpError::Invalid("symlink with an empty target".into()));
        }
        if target.contains(&0) {
            return Err(OpError::Invalid("NUL byte in symlink target".into()));
        }
        let parent = self.parent(path)?;
        self.clear(path, &parent, false)?;
        rustix::fs::symlinkat(OsStr::from_bytes(target), parent.dir(), parent.name())
            .map_err(|e| self.io_err("create symlink", path, e))?;
        self.finish_special(path, &parent, meta, None)
    }

    fn hard_link(&mut self, path: &Path, raw_target: &[u8]) -> Result<(), OpError> {
        let target = name::clean_name(raw_target).map_err(|r| {
            OpError::Invalid(format!(
                "hard link target {:?}: {r}",
                String::from_utf8_lossy(raw_target)
            ))
        })?;
        if target.as_os_str().is_empty() {
            return Err(OpError::Invalid("hard link to the root directory".into()));
        }
        if target == path {
            return Ok(());
        }
        if self.pool_busy() {
            self.drain_pool()?;
        }
        let source = self.root.resolve_parent(&target)?;
        let source_stat =
            rustix::fs::statat(source.dir(), source.name(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| self.io_err("find hard link target", &target, e))?;
        if FileType::from_raw_mode(source_stat.st_mode) == FileType::Directory {
            return Err(OpError::Invalid(format!(
                "hard link to a directory ({})",
                target.display()
            )));
        }
        let parent = self.parent(path)?;
        if let Ok(existing) =
            rustix::fs::statat(parent.dir(), parent.name(), AtFlags::SYMLINK_NOFOLLOW)
        {
            if existing.st_dev == source_stat.st_dev && existing.st_ino == source_stat.st_ino {
                return Ok(());
            }
        }
        self.clear(path, &parent, false)?;
        rustix::fs::linkat(
            source.dir(),
            source.name(),
            parent.dir(),
            parent.name(),
            AtFlags::empty(),
        )
        .map_err(|e| self.io_err("create hard link", path, e))?;
        if self.on_event.is_some() {
            let file = self.open_no_follow(path, &parent)?;
            self.emit_written(path, &file)?;
            // The target's link count changed too.
            self.emit_written(&target, &file)?;
        }
        Ok(())
    }

    fn node(
        &mut self,
        path: &Path,
        entry_type: tar::EntryType,
        meta: &EntryMeta,
    ) -> Result<(), OpError> {
        let (file_type, what) = match entry_type {
            tar::EntryType::Char => (FileType::CharacterDevice, "character device"),
            tar::EntryType::Block => (FileType::BlockDevice, "block device"),
            _ => (FileType::Fifo, "FIFO"),
        };
        let dev = match file_type {
            FileType::Fifo => 0,
            _ => rustix::fs::makedev(meta.device.0, meta.device.1),
        };
        if self.overlay && file_type == FileType::CharacterDevice && dev == 0 {
            return Err(OpError::Invalid(
                "a 0:0 character device reads as a whiteout in an overlay lower dir".into(),
            ));
        }
        let parent = self.parent(path)?;
        self.clear(path, &parent, false)?;
        match rustix::fs::mknodat(
            parent.dir(),
            parent.name(),
            file_type,
            Mode::from_raw_mode(0o600),
            dev,
        ) {
            Ok(()) => {}
            Err(e @ (Errno::PERM | Errno::ACCESS)) => {
                let (major, minor) = meta.device;
                self.skip(
                    path,
                    format!("{what} {major}:{minor} not created: {e} (creating device nodes needs CAP_MKNOD)"),
                );
                return Ok(());
            }
            Err(e) => return Err(self.io_err("create", path, e).into()),
        }
        self.finish_special(path, &parent, meta, Some(meta.mode))
    }

    /// Owner, mode (not for symlinks), xattrs and times of an entry that cannot be opened for
    /// reading without side effects (symlink, device, FIFO): all set without following it.
    fn finish_special(
        &mut self,
        path: &Path,
        parent: &ParentDir,
        meta: &EntryMeta,
        mode: Option<u32>,
    ) -> Result<(), OpError> {
        rustix::fs::chownat(
            parent.dir(),
            parent.name(),
            Some(uid(meta.uid)),
            Some(gid(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io_err("change owner of", path, e))?;
        if let Some(mode) = mode {
            // chmod through the O_PATH descriptor's /proc link changes exactly the inode just
            // created; without /proc, the name in the held directory is the same inode (only
            // this unpack writes the root).
            let node = rustix::fs::openat(
                parent.dir(),
                parent.name(),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.io_err("open", path, e))?;
            let proc_path = format!("/proc/self/fd/{}", node.as_raw_fd());
            match rustix::fs::chmod(proc_path.as_str(), Mode::from_bits_retain(mode)) {
                Ok(()) => {}
                Err(Errno::NOENT) => rustix::fs::chmodat(
                    parent.dir(),
                    parent.name(),
                    Mode::from_bits_retain(mode),
                    AtFlags::empty(),
                )
                .map_err(|e| self.io_err("change mode of", path, e))?,
                Err(e) => return Err(self.io_err("change mode of", path, e).into()),
            }
        }
        self.set_xattrs(path, XattrTarget::InDir(parent), &meta.xattrs)?;
        rustix::fs::utimensat(
            parent.dir(),
            parent.name(),
            &meta.times,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io_err("set times of", path, e))?;
        if self.on_event.is_some() {
            let file = self.open_no_follow(path, parent)?;
            self.emit_written(path, &file)?;
        }
        Ok(())
    }

    /// The directory that will hold `path`, created (with parents, mode 0755) if missing.
    fn parent(&mut self, path: &Path) -> Result<ParentDir, OpError> {
        // A queued file in the way must exist before the path is resolved, so the resolution
        // fails on it (not a directory) instead of creating a directory in its place.
        if self
            .pool
            .as_ref()
            .is_some_and(|pool| path.ancestors().skip(1).any(|a| pool.is_queued(a)))
        {
            self.drain_pool()?;
        }
        let parent = match self.root.resolve_parent(path) {
            Ok(parent) => parent,
            Err(e) if e.is_not_found() => {
                let dir = path.parent().unwrap_or(Path::new(""));
                if self.overlay {
                    // A directory made up here would hide, in the overlay, what lower layers
                    // have at that path (their mode, owner, or a symlink such as `/bin`).
                    return Err(not_alone(dir));
                }
                self.root.mkdir_all(dir, 0o755)?;
                self.root.resolve_parent(path)?
            }
            Err(e) => return Err(e.into()),
        };
        self.preserve_dir_time(path.parent().unwrap_or(Path::new("")), parent.dir());
        Ok(parent)
    }

    /// Remembers the times of a directory this layer is about to change without listing it, so
    /// they are put back at the end: only a layer's own directory entries set directory times
    /// (as umoci does), which keeps unpacked trees independent of entry order.
    fn preserve_dir_time(&mut self, dir_path: &Path, dir: BorrowedFd<'_>) {
        if self.dir_times.contains_key(dir_path) {
            return;
        }
        if let Ok(st) = rustix::fs::fstat(dir) {
            let times = Timestamps {
                last_access: Timespec {
                    tv_sec: st.st_atime as _,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: Timespec {
                    tv_sec: st.st_mtime as _,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            };
            self.dir_times.insert(dir_path.to_path_buf(), times);
        }
    }

    /// Makes room for a new entry at `path`: removes what is there unless it is a directory and
    /// `keep_dir`. Returns whether a directory was kept.
    fn clear(&mut self, path: &Path, parent: &ParentDir, keep_dir: bool) -> Result<bool, OpError> {
        if self.pool.as_ref().is_some_and(|p| p.is_queued(path)) {
            self.drain_pool()?;
        }
        let st = match rustix::fs::statat(parent.dir(), parent.name(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(self.io_err("stat", path, e).into()),
        };
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        if keep_dir && is_dir {
            return Ok(true);
        }
        if is_dir && self.pool_busy() {
            // Queued files may be inside the directory about to go.
            self.drain_pool()?;
        }
        remove_entry(parent.dir(), parent.name())
            .map_err(|e| self.io_err_std("remove", path, e))?;
        self.dir_times.remove(path);
        self.emit(UnpackEvent::Removed { path });
        Ok(false)
    }

    fn set_xattrs(
        &mut self,
        path: &Path,
        target: XattrTarget<'_>,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), OpError> {
        for (name, value) in xattrs {
            if self.overlay && name.as_bytes().starts_with(b"trusted.overlay.") {
                // overlayfs would obey it (redirects, metacopy) instead of keeping it as data.
                return Err(OpError::Invalid(format!(
                    "xattr {} is overlayfs's own, so the layer cannot be an overlay lower dir",
                    name.to_string_lossy()
                )));
            }
            let result = match &target {
                XattrTarget::Fd(fd) => {
                    rustix::fs::fsetxattr(fd, name.as_os_str(), value, XattrFlags::empty())
                }
                XattrTarget::InDir(parent) => {
                    let mut proc_path =
                        OsString::from(format!("/proc/self/fd/{}/", parent.dir().as_raw_fd()));
                    proc_path.push(parent.name());
                    rustix::fs::lsetxattr(
                        proc_path.as_os_str(),
                        name.as_os_str(),
                        value,
                        XattrFlags::empty(),
                    )
                }
            };
            match result {
                Ok(()) => {}
                Err(e @ (Errno::NOTSUP | Errno::PERM)) => self.skip(
                    path,
                    format!(
                        "xattr {} not set: {e} (not supported or not permitted here)",
                        name.to_string_lossy()
                    ),
                ),
                Err(e) => return Err(self.io_err("set xattr on", path, e).into()),
            }
        }
        Ok(())
    }

    fn open_no_follow(&self, path: &Path, parent: &ParentDir) -> Result<File, OpError> {
        rustix::fs::openat(
            parent.dir(),
            parent.name(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(|e| self.io_err("open", path, e).into())
    }

    fn emit_written(&mut self, path: &Path, file: &File) -> Result<(), OpError> {
        if self.on_event.is_some() {
            let metadata = file
                .metadata()
                .map_err(|e| self.io_err_std("stat", path, e))?;
            self.emit(UnpackEvent::Written {
                path,
                metadata: &metadata,
            });
        }
        Ok(())
    }

    fn emit(&mut self, event: UnpackEvent<'_>) {
        if let Some(callback) = self.on_event.as_mut() {
            callback(event);
        }
    }

    fn skip(&mut self, path: &Path, reason: String) {
        tracing::warn!(layer = %self.layer, entry = %path.display(), "skipped: {reason}");
        self.skipped.push(SkippedEntry {
            path: path.to_path_buf(),
            reason,
        });
    }

    fn mark(&mut self, path: &Path) {
        let mut current = Some(path);
        while let Some(p) = current {
            let key = self.keys.hash_one(p.as_os_str().as_bytes());
            if !self.this_layer.insert(key) {
                // Parents of a marked path are marked already.
                break;
            }
            current = p.parent();
        }
    }

    fn in_layer(&self, path: &Path) -> bool {
        self.this_layer
            .contains(&self.keys.hash_one(path.as_os_str().as_bytes()))
    }

    fn invalid(&self, shown: &str, reason: &str) -> Failure {
        Failure::Entry(UnpackError::InvalidEntry {
            layer: self.layer.clone(),
            entry: shown.to_owned(),
            reason: reason.to_owned(),
        })
    }

    fn file_op_error(&self, path: &Path, (op, source): FileOpError) -> OpError {
        OpError::Root(self.io_err_std(op, path, source))
    }

    fn io_err(&self, op: &'static str, path: &Path, e: Errno) -> RootError {
        self.io_err_std(op, path, e.into())
    }

    fn io_err_std(&self, op: &'static str, path: &Path, source: io::Error) -> RootError {
        RootError::Io {
            op,
            root: self.root.path().to_path_buf(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where xattrs go: an open file or directory, or a name in a held directory (symlinks and
/// device nodes, which must not be opened).
enum XattrTarget<'a> {
    Fd(BorrowedFd<'a>),
    InDir(&'a ParentDir),
}

/// The error for a file whose content ends `missing` bytes before its declared `size`.
fn truncated(path: &Path, missing: u64, size: u64) -> OpError {
    OpError::Stream(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "{}: stream ended {missing} bytes before the end of its declared {size} bytes",
            path.display()
        ),
    ))
}

/// Hands each finished queued file to the caller's callback, if any, as a `Written` event.
fn report_written<'a, 'o>(
    on_event: &'a mut Option<&'o mut dyn FnMut(UnpackEvent<'_>)>,
) -> impl FnMut(&Path, &std::fs::Metadata) + use<'a, 'o> {
    move |path, metadata| {
        if let Some(callback) = on_event.as_mut() {
            callback(UnpackEvent::Written { path, metadata });
        }
    }
}

fn uid(raw: u32) -> Uid {
    Uid::from_raw(raw)
}

fn gid(raw: u32) -> Gid {
    Gid::from_raw(raw)
}

/// The error for an entry whose directory the layer does not list, when the layer is unpacked
/// on its own: where that directory comes from depends on the layers below.
fn not_alone(dir: &Path) -> OpError {
    OpError::Invalid(format!(
        "its directory {:?} is not in the layer, which therefore cannot be unpacked on its own",
        dir
    ))
}

//! The snapshot index: what every path of a rootfs looked like when it was last observed.
//!
//! An entry holds the metadata a stat call returns (inode, size, mode, owner, times, link count)
//! and, only for entries that were *racy* when observed, a [`Proof`]: hashes of the content (or
//! symlink target) and of the extended attributes, so the next snapshot can tell a same-tick
//! rewrite from no change at all.
//!
//! # The racy rule
//!
//! File timestamps advance in clock ticks. A change made after an entry was observed gets a ctime
//! at least as new as the tick the observation happened in, so it normally shows up as a
//! different ctime. It does not when the change happens within the same tick as the entry's
//! recorded ctime. Such an entry can only exist if its recorded ctime is not older than the moment
//! the observation started ("racy", the rule git applies to its index). For those entries, and
//! only for them, the index keeps a [`Proof`] taken at observation time; the next snapshot
//! recomputes it when the metadata looks unchanged and reports the entry as modified if it
//! differs. Every other entry is decided by metadata alone, because any change to it moved its
//! ctime (ctime cannot be set from user space).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_oci::Digest;

/// The type of a filesystem entry, as far as images care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket; never put in layers.
    Socket,
}

impl FileKind {
    /// The kind encoded in the `S_IFMT` bits of a mode, if it is one Linux knows.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Some(FileKind::Regular),
            libc::S_IFDIR => Some(FileKind::Directory),
            libc::S_IFLNK => Some(FileKind::Symlink),
            libc::S_IFCHR => Some(FileKind::CharDevice),
            libc::S_IFBLK => Some(FileKind::BlockDevice),
            libc::S_IFIFO => Some(FileKind::Fifo),
            libc::S_IFSOCK => Some(FileKind::Socket),
            _ => None,
        }
    }
}

/// A point in time as the filesystem stores it (seconds and nanoseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01T00:00:00Z; negative before it.
    pub sec: i64,
    /// Nanoseconds within the second, `0..1_000_000_000`.
    pub nsec: u32,
}

impl Timestamp {
    /// The coarse real-time clock, which is what the kernel stamps files with (a file changed
    /// after this call never gets an older timestamp than the value returned).
    pub fn coarse_now() -> Timestamp {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        Timestamp {
            sec: ts.tv_sec,
            nsec: ts.tv_nsec as u32,
        }
    }
}

/// Hashes that decide whether a racy entry changed while its metadata stayed equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// SHA-256 of a regular file's content or of a symlink's target; `None` for other kinds.
    pub content: Option<Digest>,
    /// SHA-256 over the sorted `name\0value` pairs of the extended attributes.
    pub xattrs: Digest,
}

/// What one path looked like when it was observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File type.
    pub kind: FileKind,
    /// Device the inode lives on (`makedev(major, minor)`), to tell hardlinks apart from equal
    /// inode numbers on other filesystems.
    pub dev: u64,
    /// Inode number; a new inode means the path was replaced.
    pub ino: u64,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Size in bytes (regular files and symlinks).
    pub size: u64,
    /// Number of hard links.
    pub nlink: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Status change time; moved by every write, chmod, chown, xattr change, link or rename.
    pub ctime: Timestamp,
    /// Device number for character and block devices (`makedev(major, minor)`).
    pub rdev: u64,
    /// Creation time, where the filesystem records one: together with the inode number it tells
    /// a recreated path from the old one even when the inode number was reused.
    pub btime: Option<Timestamp>,
    /// Present only when the entry was racy at observation time (see the module docs).
    pub proof: Option<Box<Proof>>,
}

impl Entry {
    /// Builds an entry from a `std` metadata record, e.g. one the unpacker got from `fstat`
    /// after it finished writing the path. Returns `None` for a file type Linux does not have.
    pub fn from_metadata(meta: &Metadata) -> Option<Entry> {
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            FileKind::Regular
        } else if ft.is_dir() {
            FileKind::Directory
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_char_device() {
            FileKind::CharDevice
        } else if ft.is_block_device() {
            FileKind::BlockDevice
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_socket() {
            FileKind::Socket
        } else {
            return None;
        };
        Some(Entry {
            kind,
            dev: meta.dev(),
            ino: meta.ino(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.size(),
            nlink: meta.nlink(),
            mtime: Timestamp {
                sec: meta.mtime(),
                nsec: meta.mtime_nsec() as u32,
            },
            ctime: Timestamp {
                sec: meta.ctime(),
                nsec: meta.ctime_nsec() as u32,
            },
            rdev: meta.rdev(),
            btime: meta.created().ok().and_then(|t| {
                let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
                Some(Timestamp {
                    sec: i64::try_from(d.as_secs()).ok()?,
                    nsec: d.subsec_nanos(),
                })
            }),
            proof: None,
        })
    }

    /// Builds an entry from a `statx` result. Returns `None` for a file type Linux does not have.
    pub fn from_statx(st: &rustix::fs::Statx) -> Option<Entry> {
        let mode = u32::from(st.stx_mode);
        let kind = FileKind::from_mode(mode)?;
        Some(Entry {
            kind,
            dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            mode: mode & 0o7777,
            uid: st.stx_uid,
            gid: st.stx_gid,
            size: st.stx_size,
            nlink: u64::from(st.stx_nlink),
            mtime: Timestamp {
                sec: st.stx_mtime.tv_sec,
                nsec: st.stx_mtime.tv_nsec,
            },
            ctime: Timestamp {
                sec: st.stx_ctime.tv_sec,
                nsec: st.stx_ctime.tv_nsec,
            },
            rdev: libc::makedev(st.stx_rdev_major, st.stx_rdev_minor),
            btime: (st.stx_mask & libc::STATX_BTIME != 0).then_some(Timestamp {
                sec: st.stx_btime.tv_sec,
                nsec: st.stx_btime.tv_nsec,
            }),
            proof: None,
        })
    }

    /// Whether both describe the same inode: same device and number and, where both know it,
    /// the same creation time.
    pub fn same_inode(&self, other: &Entry) -> bool {
        self.dev == other.dev
            && self.ino == other.ino
            && match (self.btime, other.btime) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// Whether all stat fields are equal (the proof is not compared).
    pub fn same_stat(&self, other: &Entry) -> bool {
        self.kind == other.kind
            && self.same_inode(other)
            && self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && self.size == other.size
            && self.nlink == other.nlink
            && self.mtime == other.mtime
            && self.ctime == other.ctime
            && self.rdev == other.rdev
    }

    /// Whether the fields kaniko's `full` mode looks at besides content are equal: everything
    /// but ctime, inode and device, which move without the visible file changing.
    /// A directory's size and link count are not compared: a layer does not carry them, and
    /// they move without any visible change (a directory that grew and shrank again, or one
    /// copied up by overlayfs, which reports 1 link for it from then on).
    pub fn same_visible_stat(&self, other: &Entry) -> bool {
        let directory = self.kind == FileKind::Directory;
        self.kind == other.kind
            && self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && (directory || self.size == other.size)
            && (directory || self.nlink == other.nlink)
            && self.mtime == other.mtime
            && self.rdev == other.rdev
    }

    /// Whether a change after an observation that started at `observed_at` could have kept this
    /// entry's ctime (see the module docs).
    pub fn is_racy(&self, observed_at: Timestamp) -> bool {
        self.ctime >= observed_at
    }
}

/// Path → [`Entry`] for one rootfs. Paths are relative to the root, without a leading `/`; the
/// root itself is not in the index.
#[derive(Debug, Clone, Default)]
pub struct Index {
    pub(crate) entries: HashMap<Key, Entry>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Index {
        Index::default()
    }

    /// Records one path as its writer (the layer unpacker) left it.
    ///
    /// Contract: `meta` is the path's state after the writer's last write, chmod, chown or xattr
    /// change to it (a path written again later is recorded again; link counts and directory
    /// times that move later are refreshed by [`Index::seal`]), and nothing else writes under
    /// the root until `seal` runs. Leading `/` and `./` are normalised away.
    pub fn record(&mut self, rel_path: &Path, meta: &Metadata) {
        let Some(entry) = Entry::from_metadata(meta) else {
            return;
        };
        let key = key_of(rel_path);
        if key.is_empty() {
            return;
        }
        self.entries.insert(key, entry);
    }

    /// Feeds one event of [`crate::unpack::unpack_layer`]'s `on_event` callback into the index,
    /// so unpacking a stage's base image also builds the baseline of its first snapshot. Call
    /// [`Index::seal`] after the last layer.
    pub fn observe(&mut self, event: &crate::unpack::UnpackEvent<'_>) {
        match event {
            crate::unpack::UnpackEvent::Written { path, metadata } => self.record(path, metadata),
            crate::unpack::UnpackEvent::Removed { path } => self.forget(path),
        }
    }

    /// Forgets a path and everything under it, for a writer that removed it (a whiteout).
    pub fn forget(&mut self, rel_path: &Path) {
        let key = key_of(rel_path);
        match self.entries.remove(&key) {
            // Only a directory (or a path never recorded) can have recorded descendants.
            Some(entry) if entry.kind != FileKind::Directory => {}
            _ => self.entries.retain(|k, _| !is_under(k, &key)),
        }
    }

    /// Ends a recording session and makes the index as good as one made by a full walk, at the
    /// cost of a few hundred `statx` calls instead of a walk:
    /// - entries recorded below a path that is recorded as a non-directory (the writer went
    ///   through a symlink) are dropped; the next snapshot sees them at their real path;
    /// - directories and multiply linked files are stat'ed again, because writing other paths
    ///   moves their link counts and times after they were recorded;
    /// - entries whose ctime falls in the current clock tick are racy, so their proofs are
    ///   computed now, reading those few files.
    pub fn seal(&mut self, root: &Path) -> std::io::Result<()> {
        let opened = super::walk::open_root(root)?;
        let through_symlink: Vec<Key> = self
            .entries
            .keys()
            .filter(|key| {
                let mut end = key.len();
                while let Some(slash) = key[..end].iter().rposition(|b| *b == b'/') {
                    end = slash;
                    match self.entries.get(&key[..end]) {
                        Some(parent) if parent.kind != FileKind::Directory => return true,
                        _ => {}
                    }
                }
                false
            })
            .cloned()
            .collect();
        for key in through_symlink {
            self.entries.remove(&key);
        }
        let mut vanished = Vec::new();
        for (key, entry) in self.entries.iter_mut() {
            if entry.kind == FileKind::Directory || entry.nlink > 1 {
                match super::walk::stat_beneath(&opened, as_path(key)) {
                    Ok(fresh) => *entry = fresh,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        vanished.push(key.clone())
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for key in vanished {
            self.entries.remove(&key);
        }
        let now = Timestamp::coarse_now();
        for (key, entry) in self.entries.iter_mut() {
            if entry.kind != FileKind::Socket && entry.is_racy(now) {
                entry.proof = Some(Box::new(super::walk::proof_of(
                    &opened,
                    as_path(key),
                    entry.kind,
                )?));
            }
        }
        Ok(())
    }

    /// The entry of a path, if it was observed.
    pub fn get(&self, rel_path: &Path) -> Option<&Entry> {
        self.entries.get(&key_of(rel_path))
    }

    /// Number of paths.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no path is recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All paths and entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &Entry)> {
        self.entries.iter().map(|(k, e)| (as_path(k), e))
    }
}

/// Strips a leading `/` or `./` and `.` components, so every caller's spelling of a path maps to
/// one index key.
pub(crate) fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            std::path::Component::Normal(c) => out.push(c),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// An index key: a normalised relative path as bytes. Hashing and comparing bytes is several
/// times cheaper than doing it on a `Path`, which re-parses its components every time, and the
/// walk does both for every entry.
pub(crate) type Key = Vec<u8>;

/// The key of a path in any spelling.
pub(crate) fn key_of(path: &Path) -> Key {
    normalise(path).into_os_string().into_vec()
}

/// A key seen as a path.
pub(crate) fn as_path(key: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(key))
}

/// Whether `key` is `prefix` or lies below it.
pub(crate) fn is_under(key: &[u8], prefix: &[u8]) -> bool {
    key.starts_with(prefix) && (key.len() == prefix.len() || key[prefix.len()] == b'/')
}

/// `parent/name` as a key (`name` alone below the root).
pub(crate) fn join_key(parent: &[u8], name: &[u8]) -> Key {
    let mut key = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        key.extend_from_slice(parent);
        key.push(b'/');
    }
    key.extend_from_slice(name);
    key
}

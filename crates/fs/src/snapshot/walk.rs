//! The parallel stat walk: one task per directory on rayon's work-stealing pool, `getdents64`
//! for the names and `statx` relative to the directory's fd for the metadata, comparing each
//! entry with the index as it goes.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_oci::{Digest, Hasher};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags};

use super::ignore::IgnoreSet;
use super::index::{as_path, join_key, Entry, FileKind, Key, Proof, Timestamp};
use super::SnapshotMode;

/// A rootfs opened once per walk: its path (for path-based xattr calls) and a directory fd that
/// every other lookup is relative to.
pub(crate) struct Root {
    pub(crate) path: PathBuf,
    pub(crate) fd: OwnedFd,
}

/// Opens the root directory itself.
pub(crate) fn open_root(root: &Path) -> io::Result<Root> {
    let fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(Root {
        path: root.to_path_buf(),
        fd,
    })
}

/// Opens `rel` under the root without following any symlink on the way, so a path the walk
/// saw as a directory cannot be swapped for a link that leads elsewhere.
pub(crate) fn open_beneath(root: &Root, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    if rel.as_os_str().is_empty() {
        return Ok(rustix::fs::openat(
            &root.fd,
            c".",
            flags | OFlags::DIRECTORY,
            Mode::empty(),
        )?);
    }
    match rustix::fs::openat2(
        &root.fd,
        rel,
        flags,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Err(rustix::io::Errno::NOSYS) => {
            Ok(rustix::fs::openat(&root.fd, rel, flags, Mode::empty())?)
        }
        other => Ok(other?),
    }
}

/// `statx` of `rel` without following a final symlink, resolving its parent without symlinks.
pub(crate) fn stat_beneath(root: &Root, rel: &Path) -> io::Result<Entry> {
    let (parent, name) = match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => (parent, name),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a path below the root",
            ))
        }
    };
    let dir = open_beneath(root, parent, OFlags::PATH | OFlags::DIRECTORY)?;
    let st = rustix::fs::statx(
        &dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS | StatxFlags::BTIME,
    )?;
    Entry::from_statx(&st).ok_or_else(|| io::Error::other("unknown file type"))
}

/// Extended attributes of `rel` (not following a symlink), sorted by name.
pub(crate) fn read_xattrs(root: &Root, rel: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    xattrs_of(&root.path.join(rel))
}

/// Extended attributes of `path` (not following a symlink), sorted by name; none where the
/// filesystem has none.
pub(crate) fn xattrs_of(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    let len = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => {
                let need: usize = rustix::fs::llistxattr(path, &mut [0u8; 0][..])?;
                names.resize(need.max(names.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = OsStr::from_bytes(name);
        let mut value = vec![0u8; 256];
        let vlen = loop {
            match rustix::fs::lgetxattr(path, cname, &mut value[..]) {
                Ok(n) => break Some(n),
                Err(rustix::io::Errno::RANGE) => {
                    let need: usize = rustix::fs::lgetxattr(path, cname, &mut [0u8; 0][..])?;
                    value.resize(need.max(value.len() * 2), 0);
                }
                // Removed between list and get: it is gone, which is what a later read sees too.
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(vlen) = vlen {
            value.truncate(vlen);
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Computes the proof of one path: content (or link target) hash and xattr hash.
pub(crate) fn proof_of(root: &Root, rel: &Path, kind: FileKind) -> io::Result<Proof> {
    let content = match kind {
        FileKind::Regular => {
            let fd = open_beneath(root, rel, OFlags::RDONLY)?;
            let mut file = std::fs::File::from(fd);
            let mut hasher = Hasher::sha256();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            Some(hasher.finish())
        }
        FileKind::Symlink => {
            let (parent, name) = split(rel)?;
            let dir = open_beneath(root, parent, OFlags::PATH | OFlags::DIRECTORY)?;
            let target = rustix::fs::readlinkat(&dir, name, Vec::new())?;
            Some(Digest::sha256_of(target.as_bytes()))
        }
        _ => None,
    };
    let mut hasher = Hasher::sha256();
    for (name, value) in read_xattrs(root, rel)? {
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(&name);
        hasher.update(&(value.len() as u64).to_le_bytes());
        hasher.update(&value);
    }
    Ok(Proof {
        content,
        xattrs: hasher.finish(),
    })
}

fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a path below the root",
        )),
    }
}

/// How a walked path compares with the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Equal to the index entry.
    Unchanged,
    /// Not in the index.
    Added,
    /// In the index with different metadata, proof or type.
    Modified,
}

/// One path seen by the walk.
pub(crate) struct Item {
    pub(crate) path: Key,
    pub(crate) entry: Entry,
    pub(crate) status: Status,
}

/// What a walk needs to know besides the tree.
pub(crate) struct WalkContext<'a> {
    pub(crate) root: &'a Root,
    pub(crate) old: &'a HashMap<Key, Entry>,
    pub(crate) ignore: &'a IgnoreSet,
    pub(crate) observed_at: Timestamp,
    pub(crate) mode: SnapshotMode,
    /// Whether birth times tell a recreated path from the old one; not on overlayfs (see
    /// [`crate::overlay::is_overlay`]).
    pub(crate) birth_times: bool,
}

/// Walks the subtree at `start` (a directory relative to the root; empty for the whole root),
/// not including `start` itself. Returns every path found, compared with the index.
pub(crate) fn walk(ctx: &WalkContext<'_>, start: &[u8]) -> Result<Vec<Item>, (PathBuf, io::Error)> {
    let batches: Mutex<Vec<Vec<Item>>> = Mutex::new(Vec::new());
    let failure: Mutex<Option<(PathBuf, io::Error)>> = Mutex::new(None);
    let shared = Shared {
        ctx,
        batches: &batches,
        failure: &failure,
    };
    rayon::scope(|scope| walk_dir(scope, &shared, start.to_vec()));
    if let Some(err) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    let batches = batches.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut items = Vec::with_capacity(batches.iter().map(Vec::len).sum());
    for batch in batches {
        items.extend(batch);
    }
    Ok(items)
}

struct Shared<'a, 'c> {
    ctx: &'a WalkContext<'c>,
    batches: &'a Mutex<Vec<Vec<Item>>>,
    failure: &'a Mutex<Option<(PathBuf, io::Error)>>,
}

fn walk_dir<'s>(scope: &rayon::Scope<'s>, shared: &'s Shared<'s, '_>, rel: Key) {
    match read_dir(scope, shared, &rel) {
        Ok(items) => shared
            .batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(items),
        // A directory removed while walking was not there when the walk's caller asked; a
        // directory that cannot be read must fail the snapshot rather than lose its changes.
        Err((_, e)) if e.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            let mut failure = shared.failure.lock().unwrap_or_else(|p| p.into_inner());
            failure.get_or_insert(err);
        }
    }
}

fn read_dir<'s>(
    scope: &rayon::Scope<'s>,
    shared: &'s Shared<'s, '_>,
    rel: &[u8],
) -> Result<Vec<Item>, (PathBuf, io::Error)> {
    let ctx = shared.ctx;
    let at = |e: io::Error| (as_path(rel).to_path_buf(), e);
    let fd =
        open_beneath(ctx.root, as_path(rel), OFlags::RDONLY | OFlags::DIRECTORY).map_err(at)?;
    let mut dir = rustix::fs::Dir::new(fd).map_err(|e| at(e.into()))?;
    let mut items = Vec::new();
    while let Some(dirent) = dir.read() {
        let dirent = dirent.map_err(|e| at(e.into()))?;
        let name: &CStr = dirent.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let path = join_key(rel, bytes);
        if ctx.ignore.is_ignored_exact(&path) {
            continue;
        }
        let dirfd = dir.fd().map_err(|e| at(e.into()))?;
        let st = match rustix::fs::statx(
            dirfd.as_fd(),
            name,
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::BASIC_STATS | StatxFlags::BTIME,
        ) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err((as_path(&path).to_path_buf(), e.into())),
        };
        let Some(mut entry) = Entry::from_statx(&st) else {
            continue;
        };
        if !ctx.birth_times {
            entry.btime = None;
        }
        let status =
            classify(ctx, &path, &mut entry).map_err(|e| (as_path(&path).to_path_buf(), e))?;
        if entry.kind == FileKind::Directory {
            let child = path.clone();
            scope.spawn(move |s| walk_dir(s, shared, child));
        }
        items.push(Item {
            path,
            entry,
            status,
        });
    }
    Ok(items)
}

/// Compares a freshly stat'ed entry with the index and fills in its proof when it needs one.
pub(crate) fn classify(ctx: &WalkContext<'_>, key: &[u8], entry: &mut Entry) -> io::Result<Status> {
    let old = ctx.old.get(key);
    let path = as_path(key);
    let provable = !matches!(entry.kind, FileKind::Socket);
    match ctx.mode {
        SnapshotMode::MtimeOnly => Ok(match old {
            None => Status::Added,
            Some(old) if old.kind != entry.kind || old.mtime != entry.mtime => Status::Modified,
            Some(_) => Status::Unchanged,
        }),
        SnapshotMode::Full => {
            let hashable = matches!(entry.kind, FileKind::Regular | FileKind::Symlink);
            if provable && (hashable || entry.is_racy(ctx.observed_at)) {
                entry.proof = Some(Box::new(proof_of(ctx.root, path, entry.kind)?));
            }
            Ok(match old {
                None => Status::Added,
                Some(old) if !old.same_visible_stat(entry) => Status::Modified,
                Some(old) if old.proof.is_some() && old.proof == entry.proof => Status::Unchanged,
                // No proof to compare against: only identical metadata says "unchanged".
                Some(old) if old.proof.is_none() && old.same_stat(entry) => Status::Unchanged,
                Some(_) => Status::Modified,
            })
        }
        SnapshotMode::Exact => {
            let racy_now = provable && entry.is_racy(ctx.observed_at);
            let status = match old {
                None => Status::Added,
                Some(old) if !old.same_stat(entry) => Status::Modified,
                Some(old) => match &old.proof {
                    // Was racy when observed: metadata cannot vouch for it, the proof decides.
                    Some(old_proof) if provable => {
                        let proof = proof_of(ctx.root, path, entry.kind)?;
                        let changed = **old_proof != proof;
                        if racy_now {
                            entry.proof = Some(Box::new(proof));
                        }
                        return Ok(if changed {
                            Status::Modified
                        } else {
                            Status::Unchanged
                        });
                    }
                    _ => Status::Unchanged,
                },
            };
            if racy_now {
                entry.proof = Some(Box::new(proof_of(ctx.root, path, entry.kind)?));
            }
            Ok(status)
        }
    }
}

//! The snapshotter: finds what a build step changed in a rootfs by comparing a parallel stat walk
//! with an [`Index`] of the previous state, reading file content only where metadata cannot
//! decide (see [`index`] for the racy rule).
//!
//! kaniko's `--use-new-run` (which detects a RUN step's changes from file mtimes instead of a
//! full content snapshot) needs no counterpart: every step already gets the metadata walk, so
//! the flag is accepted and changes nothing. `--snapshot-mode` maps through
//! [`KanikoSnapshotMode`].
//!
//! Writes under a declared `VOLUME` are kept, as BuildKit keeps them (the legacy Docker builder
//! and kaniko discard them): volumes are not in the ignore list.

pub mod ignore;
pub mod index;
mod upper;
pub(crate) mod walk;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use ignore::{IgnoreOptions, IgnoreSet};
pub use index::{Entry, FileKind, Index, Proof, Timestamp};

use index::{as_path, is_under, key_of, Key};
pub(crate) use walk::xattrs_of;
use walk::{Item, Status, WalkContext};

/// How changes are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotMode {
    /// Metadata (inode, size, mode, owner, mtime, ctime, link count, device) decides; content is
    /// hashed only for racy entries. Never misses a change, reads almost nothing. The default,
    /// and what kaniko's `redo` maps to.
    #[default]
    Exact,
    /// Every regular file's content and every symlink's target is hashed at every snapshot and
    /// compared together with mode, owner, size and mtime, as kaniko's `full` does. A path whose
    /// only change is its ctime or inode (`chmod` to the same mode, a rewrite with identical
    /// bytes and restored mtime) is then not reported. Slow: it reads the whole rootfs.
    Full,
    /// Only existence, type and mtime are compared, as kaniko's `time` does: chmod, chown, xattr
    /// changes and rewrites that restore the mtime are missed. Offered for compatibility only.
    MtimeOnly,
}

/// kaniko's `--snapshot-mode` values, accepted for compatibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KanikoSnapshotMode {
    /// `full`: kaniko hashes contents and metadata → [`SnapshotMode::Full`].
    Full,
    /// `redo`: kaniko compares mtime, size, mode, uid and gid → [`SnapshotMode::Exact`], which
    /// compares those plus ctime and inode and so is at least as fast and never misses a change.
    Redo,
    /// `time`: kaniko compares mtime only → [`SnapshotMode::MtimeOnly`].
    Time,
}

impl FromStr for KanikoSnapshotMode {
    type Err = SnapshotError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(KanikoSnapshotMode::Full),
            "redo" => Ok(KanikoSnapshotMode::Redo),
            "time" => Ok(KanikoSnapshotMode::Time),
            other => Err(SnapshotError::UnknownMode(other.to_owned())),
        }
    }
}

impl From<KanikoSnapshotMode> for SnapshotMode {
    fn from(mode: KanikoSnapshotMode) -> SnapshotMode {
        match mode {
            KanikoSnapshotMode::Full => SnapshotMode::Full,
            KanikoSnapshotMode::Redo => SnapshotMode::Exact,
            KanikoSnapshotMode::Time => SnapshotMode::MtimeOnly,
        }
    }
}

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A path under the root could not be read.
    #[error("snapshot of {root}: {path}: {source}")]
    Io {
        /// The rootfs.
        root: PathBuf,
        /// The path relative to the root (empty for the root itself).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A `--snapshot-mode` value kaniko does not have either.
    #[error("unknown snapshot mode {0:?} (expected full, redo or time)")]
    UnknownMode(String),
}

/// What happened to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The path did not exist before.
    Added,
    /// The path existed and changed (content, metadata or type).
    Modified,
    /// A directory that was removed and created again (a new inode): nothing of the old
    /// directory's content survives, so layers mark it opaque.
    Replaced,
    /// The path no longer exists.
    Deleted,
}

/// One changed path.
#[derive(Debug, Clone)]
pub struct Change {
    /// Path relative to the root.
    pub path: PathBuf,
    /// What happened.
    pub kind: ChangeKind,
    /// The path's metadata now; `None` for deletions.
    pub entry: Option<Entry>,
}

/// The changes of one step, sorted by path component by component, so every directory comes
/// right before its contents.
#[derive(Debug, Clone, Default)]
pub struct Diff {
    /// The changes, sorted.
    pub changes: Vec<Change>,
}

impl Diff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Number of changed paths.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// The change of one path, if any.
    pub fn get(&self, rel: &Path) -> Option<&Change> {
        self.changes
            .binary_search_by(|c| c.path.as_path().cmp(rel))
            .ok()
            .map(|i| &self.changes[i])
    }
}

/// Options of a [`Snapshotter`].
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Detection mode.
    pub mode: SnapshotMode,
    /// Paths never walked.
    pub ignore: IgnoreOptions,
}

/// Tracks one rootfs across the steps of a stage.
#[derive(Debug)]
pub struct Snapshotter {
    root: PathBuf,
    mode: SnapshotMode,
    ignore_options: IgnoreOptions,
    ignore: IgnoreSet,
    index: Index,
    birth_times: bool,
    /// Set when the root is an overlayfs mount whose upper dir this snapshotter may read.
    upper: Option<UpperDir>,
}

/// The upper dir of an overlayfs root: every write to the root lands in it, so a step's
/// changes are among its paths and those it held at the previous snapshot.
#[derive(Debug)]
struct UpperDir {
    path: PathBuf,
    /// Every path the upper dir held at the last snapshot, plus the paths a
    /// [`Snapshotter::snapshot_paths`] saw change since: a path written by an earlier step and
    /// removed by this one leaves no trace in the upper dir (nothing below it to hide).
    known: HashSet<Key>,
    /// Where the index's entries come from when it was not filled by a walk.
    lower: Option<LowerView>,
}

/// The mounted tree as it was before the first step (the same lower dirs without the upper
/// dir), from which the index is filled path by path as steps touch them, instead of by a
/// walk of the whole tree up front.
#[derive(Debug)]
struct LowerView {
    path: PathBuf,
    /// The device of the mounted root, which the view's entries are given: the two mounts
    /// show the same inodes under different device numbers.
    dev: u64,
    /// Paths looked up in the view, found or not: from then on the index alone knows them.
    resolved: HashSet<Key>,
    /// Directories whose whole subtree was read from the view.
    loaded: HashSet<Key>,
}

impl LowerView {
    fn open(&self) -> Result<walk::Root, (PathBuf, io::Error)> {
        walk::open_root(&self.path).map_err(|e| (PathBuf::new(), e))
    }

    /// Whether `key` or one of its ancestors had its whole subtree read.
    fn in_loaded(&self, key: &[u8]) -> bool {
        let mut end = key.len();
        loop {
            if self.loaded.contains(&key[..end]) {
                return true;
            }
            match key[..end].iter().rposition(|b| *b == b'/') {
                Some(slash) => end = slash,
                None => return false,
            }
        }
    }

    /// Puts the view's entry for `key` into `index` unless the index already speaks for it.
    fn resolve(
        &mut self,
        view: &walk::Root,
        index: &mut HashMap<Key, Entry>,
        key: &Key,
    ) -> Result<(), (PathBuf, io::Error)> {
        if key.is_empty()
            || index.contains_key(key)
            || self.resolved.contains(key)
            || self.in_loaded(key)
        {
            return Ok(());
        }
        self.resolved.insert(key.clone());
        match walk::stat_beneath(view, as_path(key)) {
            Ok(mut entry) => {
                entry.dev = self.dev;
                entry.btime = None;
                index.insert(key.clone(), entry);
                Ok(())
            }
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err((as_path(key).to_path_buf(), e)),
        }
    }

    /// Puts the view's entries for everything below directory `dir` into `index`, where the
    /// index does not already speak for them.
    fn load_subtree(
        &mut self,
        view: &walk::Root,
        index: &mut HashMap<Key, Entry>,
        ignore: &IgnoreSet,
        mode: SnapshotMode,
        dir: &Key,
    ) -> Result<(), (PathBuf, io::Error)> {
        if self.in_loaded(dir) {
            return Ok(());
        }
        self.resolve(view, index, dir)?;
        let is_dir = if dir.is_empty() {
            true
        } else {
            match walk::stat_beneath(view, as_path(dir)) {
                Ok(entry) => entry.kind == FileKind::Directory,
                Err(e) if is_absent(&e) => false,
                Err(e) => return Err((as_path(dir).to_path_buf(), e)),
            }
        };
        if is_dir {
            let nothing = HashMap::new();
            let ctx = WalkContext {
                root: view,
                old: &nothing,
                ignore,
                // Nothing in the view changes: none of its entries needs a proof.
                observed_at: Timestamp {
                    sec: i64::MAX,
                    nsec: 0,
                },
                mode,
                birth_times: false,
            };
            for item in walk::walk(&ctx, dir)? {
                if index.contains_key(&item.path)
                    || self.resolved.contains(&item.path)
                    || self.in_loaded(&item.path)
                {
                    continue;
                }
                let mut entry = item.entry;
                entry.dev = self.dev;
                self.resolved.insert(item.path.clone());
                index.insert(item.path, entry);
            }
        }
        self.loaded.insert(dir.clone());
        Ok(())
    }
}

/// Whether a lookup failed because nothing is at the path (or a parent is not a directory).
fn is_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || e.raw_os_error() == Some(libc::ELOOP)
        || e.raw_os_error() == Some(libc::ENOTDIR)
}

impl Snapshotter {
    /// A snapshotter for `root` that starts from `index`, e.g. the one the unpacker recorded
    /// and sealed, so the first snapshot of a stage costs no extra walk. Use
    /// [`Index::new`] and [`Snapshotter::rescan`] when there is none.
    pub fn new(
        root: impl Into<PathBuf>,
        index: Index,
        options: &SnapshotOptions,
    ) -> Result<Self, SnapshotError> {
        let root = root.into();
        let ignore =
            IgnoreSet::resolve(&root, &options.ignore).map_err(|source| SnapshotError::Io {
                root: root.clone(),
                path: PathBuf::new(),
                source,
            })?;
        Ok(Snapshotter {
            birth_times: !crate::overlay::is_overlay(&root),
            root,
            mode: options.mode,
            ignore_options: options.ignore.clone(),
            ignore,
            index,
            upper: None,
        })
    }

    /// Finds later changes from `upper`, the upper dir of the overlayfs mounted at the root,
    /// instead of walking the whole root: only the paths the upper dir holds (now, or at the
    /// previous snapshot) are looked at through the root, and the subtrees of the directories
    /// it made new or opaque. A step then costs what it wrote, not what the base holds. The
    /// index must describe the root as it is now (after [`Snapshotter::rescan`], say); the
    /// results are those of a whole walk, as nothing changes the root but through the upper
    /// dir.
    pub fn follow_upper_dir(&mut self, upper: impl Into<PathBuf>) -> Result<(), SnapshotError> {
        let path = upper.into();
        let listing = upper::list(&path, &self.ignore, None)
            .map_err(|(rel, source)| self.upper_error(&path, rel, source))?;
        self.upper = Some(UpperDir {
            path,
            known: listing.singles.into_iter().collect(),
            lower: None,
        });
        Ok(())
    }

    /// Like [`Snapshotter::follow_upper_dir`], for a root mounted a moment ago whose index is
    /// still empty: instead of a walk of the whole tree, the index is filled from
    /// `lower_view` (the same lower dirs mounted without the upper dir) only where steps
    /// write. When the upper dir already holds something, the view no longer shows the tree
    /// and the whole tree is walked instead.
    pub fn follow_upper_dir_over(
        &mut self,
        upper: impl Into<PathBuf>,
        lower_view: impl Into<PathBuf>,
    ) -> Result<(), SnapshotError> {
        let path = upper.into();
        let listing = upper::list(&path, &self.ignore, None)
            .map_err(|(rel, source)| self.upper_error(&path, rel, source))?;
        if !listing.singles.is_empty() || !self.index.is_empty() {
            self.rescan()?;
            return self.follow_upper_dir(path);
        }
        let st = rustix::fs::statx(
            rustix::fs::CWD,
            &self.root,
            rustix::fs::AtFlags::empty(),
            rustix::fs::StatxFlags::BASIC_STATS,
        )
        .map_err(|e| self.io_error(PathBuf::new(), e.into()))?;
        self.upper = Some(UpperDir {
            path,
            known: HashSet::new(),
            lower: Some(LowerView {
                path: lower_view.into(),
                dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
                resolved: HashSet::new(),
                loaded: HashSet::new(),
            }),
        });
        Ok(())
    }

    /// What the index knows of `rel` (relative to the root) as of the last snapshot, looked up
    /// in the lower view first when the index is filled as steps go.
    pub fn entry(&mut self, rel: &Path) -> Result<Option<Entry>, SnapshotError> {
        let key = key_of(rel);
        if let Some(view) = self.upper.as_mut().and_then(|u| u.lower.as_mut()) {
            let resolved = view
                .open()
                .and_then(|opened| view.resolve(&opened, &mut self.index.entries, &key));
            if let Err((path, source)) = resolved {
                let root = view.path.clone();
                return Err(SnapshotError::Io { root, path, source });
            }
        }
        Ok(self.index.entries.get(&key).cloned())
    }

    /// The rootfs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The index as of the last snapshot. After [`Snapshotter::follow_upper_dir_over`] it
    /// holds only the paths steps have touched; [`Snapshotter::entry`] looks up any path.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The resolved ignore set.
    pub fn ignore_set(&self) -> &IgnoreSet {
        &self.ignore
    }

    /// Hands the index back, e.g. to keep it for a later stage that starts from this one.
    pub fn into_index(self) -> Index {
        self.index
    }

    /// Brings the index up to date with the tree, reporting nothing: a fresh walk of the whole
    /// tree, or, when the snapshotter follows an upper dir, a look at what the upper dir holds.
    pub fn rescan(&mut self) -> Result<(), SnapshotError> {
        if self.upper.is_some() {
            self.snapshot_upper()?;
            return Ok(());
        }
        self.index = Index::new();
        self.snapshot()?;
        Ok(())
    }

    /// Walks the whole rootfs once, returns what changed since the previous snapshot and makes
    /// the current state the new baseline.
    pub fn snapshot(&mut self) -> Result<Diff, SnapshotError> {
        if self.upper.is_some() {
            return self.snapshot_upper();
        }
        self.refresh_ignore()?;
        let observed_at = Timestamp::coarse_now();
        let root = self.open_root()?;
        let ctx = WalkContext {
            root: &root,
            old: &self.index.entries,
            ignore: &self.ignore,
            observed_at,
            mode: self.mode,
            birth_times: self.birth_times,
        };
        let items = walk::walk(&ctx, b"").map_err(|(path, source)| self.io_error(path, source))?;
        let mut new_entries: HashMap<Key, Entry> = HashMap::with_capacity(items.len());
        let mut changes = Vec::new();
        for item in items {
            if let Some(change) = self.change_of(&item) {
                changes.push(change);
            }
            new_entries.insert(item.path, item.entry);
        }
        for (key, entry) in std::mem::take(&mut self.index.entries) {
            if new_entries.contains_key(&key) {
                continue;
            }
            if self.ignore.is_key_ignored(&key) {
                // Never walked: whatever the index knew stays true for the next step.
                new_entries.insert(key, entry);
                continue;
            }
            changes.push(Change {
                path: as_path(&key).to_path_buf(),
                kind: ChangeKind::Deleted,
                entry: None,
            });
        }
        self.index.entries = new_entries;
        Ok(self.finish(changes))
    }

    /// Snapshot of a step that reports the paths it wrote (COPY/ADD): only those paths, the
    /// subtrees of the directories among them, and their parent directories are looked at.
    /// A listed path that no longer exists is reported deleted with everything under it.
    pub fn snapshot_paths<P: AsRef<Path>>(&mut self, paths: &[P]) -> Result<Diff, SnapshotError> {
        self.refresh_ignore()?;
        let observed_at = Timestamp::coarse_now();
        let root = self.open_root()?;
        let mut targets: Vec<Key> = paths
            .iter()
            .map(|p| key_of(p.as_ref()))
            .filter(|k| !k.is_empty() && !self.ignore.is_key_ignored(k))
            .collect();
        targets.sort();
        targets.dedup();
        let listed: HashSet<Key> = targets.iter().cloned().collect();
        let (diff, _) = self.compare(&root, observed_at, targets, &listed)?;
        if let Some(upper) = self.upper.as_mut() {
            for change in &diff.changes {
                let key = key_of(&change.path);
                if change.kind == ChangeKind::Deleted {
                    upper.known.remove(&key);
                } else {
                    upper.known.insert(key);
                }
            }
        }
        Ok(diff)
    }

    /// The snapshot of a root that follows its overlayfs upper dir: see
    /// [`Snapshotter::follow_upper_dir`].
    fn snapshot_upper(&mut self) -> Result<Diff, SnapshotError> {
        self.refresh_ignore()?;
        let observed_at = Timestamp::coarse_now();
        let root = self.open_root()?;
        let listing = {
            let Snapshotter {
                upper,
                index,
                ignore,
                ..
            } = self;
            let Some(upper) = upper.as_mut() else {
                return Err(self.io_error(PathBuf::new(), io::Error::other("no upper dir")));
            };
            let listed = match upper.lower.as_mut() {
                Some(view) => view.open().and_then(|opened| {
                    upper::list(
                        &upper.path,
                        ignore,
                        Some(&mut |key: &Key| {
                            view.resolve(&opened, &mut index.entries, key)?;
                            Ok(old_dir(&index.entries, key))
                        }),
                    )
                }),
                None => upper::list(
                    &upper.path,
                    ignore,
                    Some(&mut |key: &Key| Ok(old_dir(&index.entries, key))),
                ),
            };
            listed.map_err(|(rel, source)| SnapshotError::Io {
                root: upper.path.clone(),
                path: rel,
                source,
            })?
        };
        let known = self.upper.as_ref().map(|u| &u.known);
        let mut targets: Vec<Key> = listing
            .singles
            .into_iter()
            .chain(known.into_iter().flatten().cloned())
            .chain(listing.subtrees.iter().cloned())
            .filter(|k| !self.ignore.is_key_ignored(k))
            .collect();
        targets.sort();
        targets.dedup();
        let walked: HashSet<Key> = listing.subtrees.into_iter().collect();
        let (diff, present) = self.compare(&root, observed_at, targets, &walked)?;
        if let Some(upper) = self.upper.as_mut() {
            upper.known = present;
        }
        Ok(diff)
    }

    /// Fills the index from the lower view, when it is filled as steps go, for `keys` and for
    /// the whole subtrees of `subtrees`.
    fn load_from_lower_view<'k>(
        &mut self,
        keys: impl Iterator<Item = &'k Key>,
        subtrees: impl Iterator<Item = &'k Key>,
    ) -> Result<(), SnapshotError> {
        let Snapshotter {
            upper,
            index,
            ignore,
            mode,
            ..
        } = self;
        let Some(view) = upper.as_mut().and_then(|u| u.lower.as_mut()) else {
            return Ok(());
        };
        let loaded = view.open().and_then(|opened| {
            for key in keys {
                view.resolve(&opened, &mut index.entries, key)?;
            }
            for dir in subtrees {
                view.load_subtree(&opened, &mut index.entries, ignore, *mode, dir)?;
            }
            Ok(())
        });
        loaded.map_err(|(path, source)| SnapshotError::Io {
            root: view.path.clone(),
            path,
            source,
        })
    }

    /// Compares `targets` (sorted keys) and their parent directories with the index, walking
    /// the subtree of every target directory in `walk`; a target that no longer exists is
    /// deleted with everything the index holds under it. Returns the diff (the index updated)
    /// and every path looked at that exists.
    fn compare(
        &mut self,
        root: &walk::Root,
        observed_at: Timestamp,
        targets: Vec<Key>,
        walk: &HashSet<Key>,
    ) -> Result<(Diff, HashSet<Key>), SnapshotError> {
        // Parents gain or lose entries (and so change mtime) when their children are written.
        let mut single: Vec<Key> = Vec::new();
        for t in &targets {
            single.push(t.clone());
            let mut end = t.len();
            while let Some(slash) = t[..end].iter().rposition(|b| *b == b'/') {
                single.push(t[..slash].to_vec());
                end = slash;
            }
        }
        single.sort();
        single.dedup();
        let mut stated: Vec<(Key, Entry)> = Vec::new();
        let mut gone: Vec<Key> = Vec::new();
        for key in single {
            let path = as_path(&key);
            let mut entry = match walk::stat_beneath(root, path) {
                Ok(entry) => entry,
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ELOOP)
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    gone.push(key);
                    continue;
                }
                Err(e) => return Err(self.io_error(path.to_path_buf(), e)),
            };
            if !self.birth_times {
                entry.btime = None;
            }
            stated.push((key, entry));
        }
        let walked_dirs: Vec<Key> = stated
            .iter()
            .filter(|(key, entry)| entry.kind == FileKind::Directory && walk.contains(key))
            .map(|(key, _)| key.clone())
            .collect();
        if self.upper.as_ref().is_some_and(|u| u.lower.is_some()) {
            self.load_from_lower_view(
                stated.iter().map(|(key, _)| key).chain(gone.iter()),
                walked_dirs.iter().chain(gone.iter()),
            )?;
        }
        let ctx = WalkContext {
            root,
            old: &self.index.entries,
            ignore: &self.ignore,
            observed_at,
            mode: self.mode,
            birth_times: self.birth_times,
        };
        let mut items: Vec<Item> = Vec::new();
        for (key, mut entry) in stated {
            let status = walk::classify(&ctx, &key, &mut entry)
                .map_err(|e| self.io_error(as_path(&key).to_path_buf(), e))?;
            items.push(Item {
                path: key,
                entry,
                status,
            });
        }
        // A walked directory inside another walked directory is covered by the outer walk.
        let outer: Vec<Key> = walked_dirs
            .iter()
            .filter(|d| !walked_dirs.iter().any(|o| o != *d && is_under(d, o)))
            .cloned()
            .collect();
        let mut seen: HashSet<Key> = items.iter().map(|i| i.path.clone()).collect();
        for dir in &outer {
            let sub =
                walk::walk(&ctx, dir).map_err(|(path, source)| self.io_error(path, source))?;
            for item in sub {
                if seen.insert(item.path.clone()) {
                    items.push(item);
                }
            }
        }
        let mut changes: Vec<Change> = items
            .iter()
            .filter_map(|item| self.change_of(item))
            .collect();
        // Index entries that vanished: targets that are gone, and anything that used to be
        // under a walked directory or a gone path but was not seen now.
        // One lookup per ancestor, not one comparison per walked or gone path: a step that
        // removed thousands of paths must not cost their number times the index's size.
        let vanished: HashSet<&[u8]> = outer.iter().chain(gone.iter()).map(Vec::as_slice).collect();
        let in_vanished = |key: &[u8]| {
            let mut end = key.len();
            loop {
                if vanished.contains(&key[..end]) {
                    return true;
                }
                match key[..end].iter().rposition(|b| *b == b'/') {
                    Some(slash) => end = slash,
                    None => return false,
                }
            }
        };
        let mut deleted: Vec<Key> = self
            .index
            .entries
            .keys()
            .filter(|k| !seen.contains(*k))
            .filter(|k| in_vanished(k))
            .filter(|k| !self.ignore.is_key_ignored(k))
            .cloned()
            .collect();
        deleted.sort();
        for key in deleted {
            self.index.entries.remove(&key);
            changes.push(Change {
                path: as_path(&key).to_path_buf(),
                kind: ChangeKind::Deleted,
                entry: None,
            });
        }
        for item in items {
            self.index.entries.insert(item.path, item.entry);
        }
        Ok((self.finish(changes), seen))
    }

    fn upper_error(&self, upper: &Path, rel: PathBuf, source: io::Error) -> SnapshotError {
        SnapshotError::Io {
            root: upper.to_path_buf(),
            path: rel,
            source,
        }
    }

    fn change_of(&self, item: &Item) -> Option<Change> {
        let kind = match item.status {
            Status::Unchanged => return None,
            Status::Added => ChangeKind::Added,
            Status::Modified => match self.index.entries.get(&item.path) {
                Some(old)
                    if old.kind == FileKind::Directory
                        && item.entry.kind == FileKind::Directory
                        && !old.same_inode(&item.entry) =>
                {
                    ChangeKind::Replaced
                }
                _ => ChangeKind::Modified,
            },
        };
        Some(Change {
            path: as_path(&item.path).to_path_buf(),
            kind,
            entry: Some(item.entry.clone()),
        })
    }

    /// Sorts the changes and adds, under every replaced directory, everything it now contains:
    /// an opaque directory hides all of the old content, so even paths whose metadata did not
    /// change (moved in, same tick) must be in the layer.
    fn finish(&self, mut changes: Vec<Change>) -> Diff {
        let replaced: Vec<Key> = changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Replaced)
            .map(|c| key_of(&c.path))
            .collect();
        if !replaced.is_empty() {
            let present: HashSet<Key> = changes
                .iter()
                .filter(|c| c.kind != ChangeKind::Deleted)
                .map(|c| key_of(&c.path))
                .collect();
            for (key, entry) in &self.index.entries {
                if present.contains(key) || self.ignore.is_key_ignored(key) {
                    continue;
                }
                if replaced.iter().any(|r| is_under(key, r) && key != r) {
                    changes.push(Change {
                        path: as_path(key).to_path_buf(),
                        kind: ChangeKind::Added,
                        entry: Some(entry.clone()),
                    });
                }
            }
        }
        changes.sort_by(|a, b| a.path.cmp(&b.path));
        Diff { changes }
    }

    /// Mounts come and go between steps (a RUN may mount something and leave it), so the mount
    /// table is read again for every snapshot; it is a few dozen lines.
    fn refresh_ignore(&mut self) -> Result<(), SnapshotError> {
        if self.ignore_options.mount_points {
            self.ignore = IgnoreSet::resolve(&self.root, &self.ignore_options)
                .map_err(|source| self.io_error(PathBuf::new(), source))?;
        }
        Ok(())
    }

    fn open_root(&self) -> Result<walk::Root, SnapshotError> {
        walk::open_root(&self.root).map_err(|source| self.io_error(PathBuf::new(), source))
    }

    fn io_error(&self, path: PathBuf, source: io::Error) -> SnapshotError {
        SnapshotError::Io {
            root: self.root.clone(),
            path,
            source,
        }
    }
}

/// Whether the index knows `key` as a directory.
fn old_dir(index: &HashMap<Key, Entry>, key: &Key) -> bool {
    index
        .get(key)
        .is_some_and(|e| e.kind == FileKind::Directory)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The racy case made deterministic: the index holds exactly the metadata the file has now
    /// (as if the rewrite happened within the clock tick of the observation, so no timestamp
    /// moved) and the proof of the content it had then.
    #[test]
    fn racy_entry_with_identical_metadata_is_decided_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("f"), "aaaa").unwrap();
        let opened = walk::open_root(root).unwrap();
        let old_proof = walk::proof_of(&opened, Path::new("f"), FileKind::Regular).unwrap();
        std::fs::write(root.join("f"), "bbbb").unwrap();
        let options = SnapshotOptions {
            ignore: IgnoreOptions {
                mount_points: false,
                ..IgnoreOptions::default()
            },
            ..SnapshotOptions::default()
        };
        for (proof, expect_change) in [
            (old_proof, true),
            (
                walk::proof_of(&opened, Path::new("f"), FileKind::Regular).unwrap(),
                false,
            ),
        ] {
            let mut entry = walk::stat_beneath(&opened, Path::new("f")).unwrap();
            entry.proof = Some(Box::new(proof));
            let mut index = Index::new();
            index.entries.insert(b"f".to_vec(), entry);
            let mut s = Snapshotter::new(root, index, &options).unwrap();
            let diff = s.snapshot().unwrap();
            assert_eq!(diff.get(Path::new("f")).is_some(), expect_change);
        }
    }
}

//! COPY (and the local-file half of ADD): Docker's source and destination rules, applied
//! through kiln-fs's [`Root`] on both sides, so nothing a source names is read from outside its
//! tree and nothing is written outside the rootfs.
//!
//! Rules (Docker/BuildKit): a source directory copies its *contents*; a source file goes to
//! `dest/NAME` when `dest` ends with `/` or is an existing directory, else to `dest` itself;
//! several sources need a directory destination; relative destinations are under WORKDIR;
//! missing parents are created 0755, owned by the `--chown` owner or root; files from the build
//! context are owned by 0:0 unless `--chown` says otherwise, files from a stage or image keep
//! their owners; `--chmod` replaces the mode of everything copied; modes and mtimes are
//! otherwise kept.
//!
//! Symlinks (BuildKit's rules): a source path is resolved by [`TreeView`], which follows its
//! symlinks, the last one included, inside the source tree only; symlinks met while walking a
//! copied directory are copied as symlinks; the destination is resolved inside the stage root
//! (a symlinked directory on the way leads to its target there), and the paths reported to the
//! snapshotter are the ones really written.
//!
//! `--exclude` patterns (`.dockerignore` syntax) are matched, as BuildKit's copier does, against
//! paths relative to each copied source directory, and against wildcard matches relative to the
//! directory the wildcard expands in. `--parents` keeps each source's path below the context root
//! (or below a `/./` pivot in the source) under the destination. ADD's archive extraction is in
//! [`crate::archive`].

use std::collections::HashMap;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use kiln_context::{ContextError, TreeView};
use kiln_fs::resolve::{Root, RootError};
use kiln_plan::{Chmod, CopySource};

use super::files::{copy_regular, set_meta_at, FileJob};

/// Where COPY reads from: a tree (the build context with its ignore rules, a stage rootfs, an
/// image), seen through its root.
pub(crate) struct SourceTree<'a> {
    /// The tree and, for the build context, its `.dockerignore`.
    pub view: TreeView<'a>,
    /// Keep source owners (stage and image sources) instead of 0:0 (context sources).
    pub keep_owner: bool,
}

/// What to copy where, after expansion.
pub(crate) struct CopyRequest<'a> {
    /// The sources as written.
    pub sources: &'a [CopySource],
    /// The destination as written.
    pub dest: &'a str,
    /// The stage's WORKDIR, for relative destinations.
    pub workdir: &'a str,
    /// `--chown`, resolved to numeric ids.
    pub owner: Option<(u32, u32)>,
    /// `--chmod`.
    pub chmod: Option<&'a Chmod>,
    /// `--exclude`: whether a path, relative to the copied source directory (or to the directory
    /// a wildcard expands in), is left out.
    pub exclude: &'a dyn Fn(&Path) -> bool,
    /// `--parents`: keep each source's parent directories under the destination.
    pub parents: bool,
    /// ADD: extract local tar archives (plain or compressed) into the destination.
    pub unpack: bool,
    /// Destinations (relative to the rootfs, as resolved there) the copy must leave alone,
    /// with everything below them: in-place mode's ignored paths (the Kiln dir, mounts). The
    /// function hears of each one it is asked about, so the caller can name them.
    pub keep_out: &'a dyn Fn(&Path) -> bool,
}

/// An `exclude` for [`CopyRequest`] that leaves nothing out.
pub(crate) fn exclude_nothing(_: &Path) -> bool {
    false
}

/// Why a copy failed; each names the path it is about (a source as written, a destination
/// inside the rootfs as `/PATH`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CopyError {
    /// A source path without wildcards names nothing the copy may read.
    #[error("{0}: not found in the build context or excluded by .dockerignore")]
    NotFound(String),
    /// A wildcard source matches nothing.
    #[error("{0}: no source files were specified (nothing matches)")]
    NoMatch(String),
    /// A source could not be resolved (a bad pattern, an unreadable directory).
    #[error("{path}: {source}")]
    Source {
        /// The source as written.
        path: String,
        /// Why.
        #[source]
        source: Box<ContextError>,
    },
    /// Several sources and a destination that is not a directory.
    #[error(
        "when using COPY with more than one source file, the destination must be a directory and end with a /: {0}"
    )]
    NeedsDirectory(String),
    /// Something at the destination could not be made.
    #[error("/{}: {source}", path.display())]
    Dest {
        /// The destination path inside the rootfs.
        path: PathBuf,
        /// Why.
        #[source]
        source: RootError,
    },
    /// Writing a file's content failed.
    #[error("/{}: {source}", path.display())]
    Write {
        /// The destination path inside the rootfs.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file would replace a directory.
    #[error("/{}: cannot overwrite a directory with a non-directory", .0.display())]
    OverwriteDirectory(PathBuf),
    /// Reading the source tree failed (the error names the path and the tree).
    #[error(transparent)]
    Read(RootError),
    /// A source entry that is neither a file, a directory nor a symlink.
    #[error("{}: only regular files, directories and symlinks can be copied", .0.display())]
    Unsupported(PathBuf),
    /// An archive could not be extracted.
    #[error("{0}")]
    Archive(String),
}

pub(super) fn dest_error(path: &Path) -> impl FnOnce(RootError) -> CopyError + '_ {
    move |source| CopyError::Dest {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies according to `request` into the rootfs `dest_root`; returns every path written or
/// created (relative to the rootfs, as resolved there: no symlink among its directories), for
/// the snapshotter.
pub(crate) fn copy(
    dest_root: &Path,
    from: &SourceTree<'_>,
    request: &CopyRequest<'_>,
) -> Result<Vec<PathBuf>, CopyError> {
    let root = Root::open(dest_root).map_err(dest_error(Path::new("")))?;
    let dest_abs = if request.dest.starts_with('/') {
        PathBuf::from(request.dest)
    } else {
        Path::new(request.workdir).join(request.dest)
    };
    let dest_rel = resolve_destination(&root, &clean_relative(&dest_abs))?;
    let dest_names_dir = request.parents
        || request.dest.ends_with('/')
        || request.dest.ends_with("/.")
        || request.dest == "."
        || root
            .metadata(&dest_rel)
            .map(|m| m.is_dir())
            .unwrap_or(false);

    let mut items: Vec<Item> = Vec::new();
    for source in request.sources {
        match source {
            // Remote sources are fetched into a tree of their own first and copied from there.
            CopySource::Url(url) | CopySource::Git(url) => {
                return Err(CopyError::NotFound(url.clone()))
            }
            CopySource::Symlink { name, target } => items.push(Item::Link {
                name: name.clone(),
                target: target.clone(),
            }),
            CopySource::Inline { name, content } => items.push(Item::Inline {
                name: name.clone(),
                content: content.clone(),
            }),
            CopySource::Path(path) => {
                let base = has_wildcard(path).then(|| wildcard_base(path));
                let pivot = request.parents.then(|| parents_pivot(path));
                for found in resolve_source(from, path)? {
                    let matched = PathBuf::from(found.matched());
                    if let Some(base) = &base {
                        if let Ok(below) = matched.strip_prefix(base) {
                            if (request.exclude)(below) {
                                continue;
                            }
                        }
                    }
                    let keep = pivot.as_ref().map(|pivot| {
                        matched
                            .strip_prefix(pivot)
                            .unwrap_or(&matched)
                            .to_path_buf()
                    });
                    items.push(Item::Path {
                        matched,
                        real: found.entry().rel_path().to_path_buf(),
                        meta: found.entry().metadata().clone(),
                        keep,
                    });
                }
            }
        }
    }
    if items.len() > 1 && !dest_names_dir {
        return Err(CopyError::NeedsDirectory(request.dest.to_owned()));
    }

    let mut writer = Writer {
        root: &root,
        from,
        owner: request.owner,
        chmod: request.chmod,
        written: Vec::new(),
        linked: HashMap::new(),
        exclude: request.exclude,
        keep_out: request.keep_out,
        pending_files: Vec::new(),
        pending_dir_times: Vec::new(),
    };
    if !dest_rel.as_os_str().is_empty() && (request.keep_out)(&dest_rel) {
        return Ok(Vec::new());
    }
    writer.ensure_dir_parents(&dest_rel)?;
    for item in items {
        if (request.keep_out)(&item.target(&dest_rel, dest_names_dir)) {
            continue;
        }
        match item {
            Item::Inline { name, content } => {
                let target = if dest_names_dir {
                    dest_rel.join(&name)
                } else {
                    dest_rel.clone()
                };
                writer.ensure_dir_parents(&target)?;
                writer.write_bytes(&target, content.as_bytes(), 0o644)?;
            }
            Item::Link { name, target: to } => {
                let target = if dest_names_dir {
                    dest_rel.join(&name)
                } else {
                    dest_rel.clone()
                };
                writer.ensure_dir_parents(&target)?;
                writer.write_link(&target, &to)?;
            }
            Item::Path {
                matched,
                real,
                meta,
                keep,
            } => {
                if let Some(keep) = keep {
                    // --parents: the kept path's directories take the metadata of their source
                    // directories when they are created.
                    let target = dest_rel.join(&keep);
                    let pivot = without_tail(&matched, &keep);
                    writer.make_source_dirs(&pivot, &keep, &dest_rel)?;
                    if meta.is_dir() {
                        writer.make_dir(&target, Some(&meta))?;
                        writer.copy_dir_contents(&real, &target)?;
                    } else {
                        writer.copy_entry(&real, &meta, &target, true)?;
                    }
                } else if meta.is_dir() {
                    writer.make_dir(&dest_rel, Some(&meta))?;
                    writer.copy_dir_contents(&real, &dest_rel)?;
                } else if let Some(format) = if request.unpack {
                    super::archive::detect(from.view.root(), &real).map_err(CopyError::Archive)?
                } else {
                    None
                } {
                    writer.extract(&real, format, &dest_rel)?;
                } else {
                    let name = matched.file_name().map(PathBuf::from).unwrap_or_default();
                    let target = if dest_names_dir {
                        dest_rel.join(name)
                    } else {
                        dest_rel.clone()
                    };
                    writer.ensure_dir_parents(&target)?;
                    writer.copy_entry(&real, &meta, &target, true)?;
                }
            }
        }
        // Each source is complete before the next: a later source's file of the same name
        // must win, as in Docker.
        writer.flush()?;
    }
    Ok(writer.written)
}

/// Creates the directory `rel` and its missing parents inside `dest_root`, owned by `uid:gid`
/// with mode 0755 (WORKDIR); symlinks on the way are followed inside the root. Returns the
/// directories created, as resolved in the root.
pub(crate) fn make_dirs(
    dest_root: &Path,
    rel: &Path,
    uid: u32,
    gid: u32,
) -> Result<Vec<PathBuf>, CopyError> {
    let root = Root::open(dest_root).map_err(dest_error(Path::new("")))?;
    let rel = resolve_destination(&root, rel)?;
    let mut missing = Vec::new();
    for ancestor in rel.ancestors() {
        if ancestor.as_os_str().is_empty() || root.symlink_metadata(ancestor).is_ok() {
            break;
        }
        missing.push(ancestor.to_path_buf());
    }
    let mut created = Vec::new();
    for dir in missing.into_iter().rev() {
        root.mkdir_all(&dir, 0o755).map_err(dest_error(&dir))?;
        set_meta_at(&root, &dir, Some((uid, gid)), Some(0o755), None)?;
        created.push(dir);
    }
    Ok(created)
}

/// Where the destination `rel` leads inside `root`: every existing symlink on the way (the last
/// one included, as BuildKit's copier resolves a destination) followed inside the root, and
/// the components that do not exist yet taken as written.
fn resolve_destination(root: &Root, rel: &Path) -> Result<PathBuf, CopyError> {
    root.resolve(rel, true).map_err(dest_error(rel))
}

enum Item {
    /// A source: the path as matched (its name is the copy's name), where it really is in the
    /// source tree after following symlinks there, what it is, and with `--parents` the part
    /// of it kept under the destination.
    Path {
        matched: PathBuf,
        real: PathBuf,
        meta: Metadata,
        keep: Option<PathBuf>,
    },
    Inline {
        name: String,
        content: String,
    },
    Link {
        name: String,
        target: String,
    },
}

impl Item {
    /// Where the item goes: its own path under a directory destination, with `--parents` its
    /// kept path, a copied directory's contents or an extracted archive into the destination.
    fn target(&self, dest: &Path, dest_names_dir: bool) -> PathBuf {
        let name = match self {
            Item::Path {
                keep: Some(keep), ..
            } => return dest.join(keep),
            Item::Path { meta, .. } if meta.is_dir() => return dest.to_path_buf(),
            Item::Path { matched, .. } => {
                matched.file_name().map(PathBuf::from).unwrap_or_default()
            }
            Item::Inline { name, .. } | Item::Link { name, .. } => PathBuf::from(name),
        };
        if dest_names_dir {
            dest.join(name)
        } else {
            dest.to_path_buf()
        }
    }
}

/// `rel` without its last components `tail`: the `--parents` pivot directory of a source.
fn without_tail(rel: &Path, tail: &Path) -> PathBuf {
    let keep = rel
        .components()
        .count()
        .saturating_sub(tail.components().count());
    rel.components().take(keep).collect()
}

/// The directory (relative to the source root) a wildcard source expands in: its components
/// before the first one with a wildcard.
fn wildcard_base(path: &str) -> PathBuf {
    clean_relative(Path::new(path))
        .components()
        .take_while(|c| !has_wildcard(&c.as_os_str().to_string_lossy()))
        .collect()
}

/// The part of a `--parents` source that is not kept: everything before its first `/./`
/// (BuildKit's pivot), or nothing, so the whole path below the context root is kept.
fn parents_pivot(path: &str) -> PathBuf {
    match path.find("/./") {
        Some(at) => clean_relative(Path::new(&path[..at])),
        None => PathBuf::new(),
    }
}

/// A path inside a root as a relative path with `.` and `..` resolved lexically (clamped at
/// the root), the way Docker cleans COPY paths.
pub(crate) fn clean_relative(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expands one source path (possibly with wildcards) to what it names in the source tree.
fn resolve_source(
    from: &SourceTree<'_>,
    path: &str,
) -> Result<Vec<kiln_context::SourceMatch>, CopyError> {
    match from.view.resolve_sources(path) {
        Ok(found) if found.is_empty() => Err(CopyError::NoMatch(path.to_owned())),
        Ok(found) => Ok(found),
        Err(ContextError::NotFound { .. }) => Err(CopyError::NotFound(path.to_owned())),
        Err(source) => Err(CopyError::Source {
            path: path.to_owned(),
            source: Box::new(source),
        }),
    }
}

struct Writer<'a> {
    root: &'a Root,
    from: &'a SourceTree<'a>,
    owner: Option<(u32, u32)>,
    chmod: Option<&'a Chmod>,
    written: Vec<PathBuf>,
    /// Source (device, inode) of multiply-linked files already copied, to their destination, so
    /// hard links inside one copy stay hard links (BuildKit keeps them).
    linked: HashMap<(u64, u64), PathBuf>,
    /// `--exclude`, matched against paths relative to the copied source directory.
    exclude: &'a dyn Fn(&Path) -> bool,
    /// Destinations not to write, see [`CopyRequest::keep_out`].
    keep_out: &'a dyn Fn(&Path) -> bool,
    /// Regular files found while walking a source directory, copied together at the end by
    /// several threads: creating files and filling their pages is kernel work that scales
    /// with cores.
    pending_files: Vec<FileJob>,
    /// Directory times to set once every file below them exists (creating a file moves its
    /// directory's mtime), deepest first.
    pending_dir_times: Vec<(PathBuf, Metadata)>,
}

impl Writer<'_> {
    /// Copies the deferred regular files on as many threads as there are cores, then sets the
    /// deferred directory times.
    fn flush(&mut self) -> Result<(), CopyError> {
        let jobs = std::mem::take(&mut self.pending_files);
        let (root, source) = (self.root, self.from.view.root());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(jobs.len().max(1));
        let first_error: std::sync::Mutex<Option<CopyError>> = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    if let Err(e) = copy_regular(root, source, job) {
                        first_error.lock().expect("copy errors").get_or_insert(e);
                        next.store(jobs.len(), std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().expect("copy errors") {
            return Err(e);
        }
        self.written.extend(jobs.into_iter().map(|job| job.target));
        for (dir, meta) in std::mem::take(&mut self.pending_dir_times) {
            set_meta_at(self.root, &dir, None, None, Some(&meta))?;
        }
        Ok(())
    }

    /// Creates missing parent directories of `target` (0755, owned by the `--chown` owner if one
    /// was given, as BuildKit's copy does, else root) and records them.
    fn ensure_dir_parents(&mut self, target: &Path) -> Result<(), CopyError> {
        let mut missing = Vec::new();
        for ancestor in target.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            match self.root.symlink_metadata(ancestor) {
                Ok(_) => break,
                Err(_) => missing.push(ancestor.to_path_buf()),
            }
        }
        for dir in missing.into_iter().rev() {
            self.root.mkdir_all(&dir, 0o755).map_err(dest_error(&dir))?;
            let owner = self.owner.unwrap_or((0, 0));
            set_meta_at(self.root, &dir, Some(owner), Some(0o755), None)?;
            self.written.push(dir);
        }
        Ok(())
    }

    /// Creates `target` as a directory (if needed) with the owner and mode rules applied.
    fn make_dir(&mut self, target: &Path, source: Option<&Metadata>) -> Result<(), CopyError> {
        if target.as_os_str().is_empty() {
            return Ok(());
        }
        self.ensure_dir_parents(target)?;
        let existed = matches!(self.root.symlink_metadata(target), Ok(m) if m.is_dir());
        if !existed {
            let _ = self.root.remove_all(target);
            self.root
                .mkdir_all(target, 0o755)
                .map_err(dest_error(target))?;
        }
        if let Some(meta) = source {
            let owner = self.owner_of(meta);
            let mode = self.mode_of(meta.mode() & 0o7777, true);
            set_meta_at(self.root, target, Some(owner), Some(mode), None)?;
        } else if let Some(owner) = self.owner {
            set_meta_at(self.root, target, Some(owner), None, None)?;
        }
        self.written.push(target.to_path_buf());
        Ok(())
    }

    /// `--parents`: creates the missing parent directories of `keep` under `dest`, each with
    /// the mode and owner rules applied to its source directory below `pivot`.
    fn make_source_dirs(
        &mut self,
        pivot: &Path,
        keep: &Path,
        dest: &Path,
    ) -> Result<(), CopyError> {
        self.ensure_dir_parents(&dest.join("_"))?;
        // The last component is the source itself, created by the caller.
        let dirs = keep.components().count().saturating_sub(1);
        let mut partial = PathBuf::new();
        for component in keep.components().take(dirs) {
            partial.push(component);
            let target = dest.join(&partial);
            if matches!(self.root.symlink_metadata(&target), Ok(m) if m.is_dir()) {
                continue;
            }
            let meta = self
                .from
                .view
                .root()
                .metadata(pivot.join(&partial))
                .map_err(CopyError::Read)?;
            self.make_dir(&target, Some(&meta))?;
        }
        Ok(())
    }

    /// ADD: extracts the archive `archive` of the source tree into the directory `dest`, which
    /// is created (with the usual owner rule) if missing and is `/` for every entry.
    fn extract(
        &mut self,
        archive: &Path,
        format: super::archive::ArchiveFormat,
        dest: &Path,
    ) -> Result<(), CopyError> {
        self.ensure_dir_parents(&dest.join("_"))?;
        self.root.mkdir_all(dest, 0o755).map_err(dest_error(dest))?;
        let dest_root = self.root.subroot(dest).map_err(dest_error(dest))?;
        let changed = super::archive::extract(
            &dest_root,
            self.from.view.root(),
            archive,
            format,
            self.owner,
        )
        .map_err(CopyError::Archive)?;
        self.written
            .extend(changed.into_iter().map(|c| dest.join(c.path)));
        Ok(())
    }

    fn owner_of(&self, meta: &Metadata) -> (u32, u32) {
        match self.owner {
            Some(ids) => ids,
            None if self.from.keep_owner => (meta.uid(), meta.gid()),
            None => (0, 0),
        }
    }

    fn mode_of(&self, mode: u32, is_dir: bool) -> u32 {
        match self.chmod {
            None => mode,
            Some(Chmod::Octal(m)) => *m,
            Some(Chmod::Symbolic(expr)) => super::chmod::apply_symbolic(expr, mode, is_dir),
        }
    }

    /// Copies what the source directory `source` (a resolved path of the source tree) holds
    /// into `dest`, as the tree's view lists it: ignored entries left out, symlinks as
    /// symlinks.
    fn copy_dir_contents(&mut self, source: &Path, dest: &Path) -> Result<(), CopyError> {
        let top = self
            .from
            .view
            .root()
            .symlink_metadata(source)
            .map_err(CopyError::Read)?;
        let listing = self
            .from
            .view
            .walk_at(source, top)
            .map_err(|e| CopyError::Source {
                path: source.display().to_string(),
                source: Box::new(e),
            })?;
        // A directory left out by --exclude takes its whole subtree with it.
        let mut excluded_dir: Option<PathBuf> = None;
        let mut dirs: Vec<(PathBuf, Metadata)> = Vec::new();
        for entry in listing {
            let below = entry
                .rel_path()
                .strip_prefix(source)
                .unwrap_or(entry.rel_path())
                .to_path_buf();
            if excluded_dir.as_ref().is_some_and(|d| below.starts_with(d)) {
                continue;
            }
            let target = dest.join(&below);
            if (self.exclude)(&below) {
                if entry.is_dir() {
                    excluded_dir = Some(below);
                }
                continue;
            }
            // A kept-out directory's entries are still walked (and not written), so that the
            // warning can name the files the image loses, not just the directory.
            if (self.keep_out)(&target) {
                continue;
            }
            let meta = entry.metadata().clone();
            if meta.is_dir() {
                self.make_dir(&target, Some(&meta))?;
                dirs.push((target, meta));
            } else if meta.is_file() && meta.nlink() == 1 {
                let (uid, gid) = self.owner_of(&meta);
                let mode = self.mode_of(meta.permissions().mode() & 0o7777, false);
                self.pending_files.push(FileJob {
                    source: entry.rel_path().to_path_buf(),
                    meta,
                    target,
                    uid,
                    gid,
                    mode,
                });
            } else {
                self.copy_entry(entry.rel_path(), &meta, &target, false)?;
            }
        }
        // Deepest first: setting a directory's times must come after its subdirectories'.
        self.pending_dir_times.extend(dirs.into_iter().rev());
        Ok(())
    }

    /// Copies one non-directory entry, `source` in the source tree, whose metadata is `meta`
    /// (its target's for a top-level source path, whose symlinks were followed; its own for
    /// an entry of a copied directory, so a symlink is copied as a symlink).
    fn copy_entry(
        &mut self,
        source: &Path,
        meta: &Metadata,
        target: &Path,
        top_level: bool,
    ) -> Result<(), CopyError> {
        if let Ok(existing) = self.root.symlink_metadata(target) {
            if existing.is_dir() && !meta.is_dir() {
                return Err(CopyError::OverwriteDirectory(target.to_path_buf()));
            }
            self.root.remove_all(target).map_err(dest_error(target))?;
        }
        let (uid, gid) = self.owner_of(meta);
        let tree = self.from.view.root();
        if meta.file_type().is_symlink() && !top_level {
            let link = tree.read_link(source).map_err(CopyError::Read)?;
            self.root
                .symlink(&link, target)
                .map_err(dest_error(target))?;
            set_meta_at(self.root, target, Some((uid, gid)), None, Some(meta))?;
        } else if meta.is_file()
            && meta.nlink() > 1
            && self.linked.contains_key(&(meta.dev(), meta.ino()))
        {
            let first = self.linked[&(meta.dev(), meta.ino())].clone();
            self.root
                .hard_link(&first, target)
                .map_err(dest_error(target))?;
        } else if meta.is_file() {
            if meta.nlink() > 1 {
                self.linked
                    .insert((meta.dev(), meta.ino()), target.to_path_buf());
            }
            let mode = self.mode_of(meta.permissions().mode() & 0o7777, false);
            copy_regular(
                self.root,
                tree,
                &FileJob {
                    source: source.to_path_buf(),
                    meta: meta.clone(),
                    target: target.to_path_buf(),
                    uid,
                    gid,
                    mode,
                },
            )?;
        } else {
            return Err(CopyError::Unsupported(source.to_path_buf()));
        }
        self.written.push(target.to_path_buf());
        Ok(())
    }

    fn write_link(&mut self, target: &Path, to: &str) -> Result<(), CopyError> {
        if let Ok(existing) = self.root.symlink_metadata(target) {
            if existing.is_dir() {
                return Err(CopyError::OverwriteDirectory(target.to_path_buf()));
            }
            self.root.remove_all(target).map_err(dest_error(target))?;
        }
        self.root.symlink(to, target).map_err(dest_error(target))?;
        let owner = self.owner.unwrap_or((0, 0));
        set_meta_at(self.root, target, Some(owner), None, None)?;
        self.written.push(target.to_path_buf());
        Ok(())
    }

    fn write_bytes(&mut self, target: &Path, content: &[u8], mode: u32) -> Result<(), CopyError> {
        if let Ok(existing) = self.root.symlink_metadata(target) {
            if existing.is_dir() {
                return Err(CopyError::OverwriteDirectory(target.to_path_buf()));
            }
            self.root.remove_all(target).map_err(dest_error(target))?;
        }
        let mut output = self
            .root
            .create(target, 0o600)
            .map_err(dest_error(target))?;
        io::Write::write_all(&mut output, content).map_err(|source| CopyError::Write {
            path: target.to_path_buf(),
            source,
        })?;
        drop(output);
        let owner = self.owner.unwrap_or((0, 0));
        let mode = self.mode_of(mode, false);
        set_meta_at(self.root, target, Some(owner), Some(mode), None)?;
        self.written.push(target.to_path_buf());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `keep_out` that writes everywhere.
    fn keep_out_nothing(_: &Path) -> bool {
        false
    }

    #[test]
    fn kept_out_destinations_are_neither_written_nor_reported() {
        let context = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        for dir in ["tree/kiln/sub", "tree/opt"] {
            std::fs::create_dir_all(context.path().join(dir)).unwrap();
        }
        for file in ["tree/kiln/sub/x", "tree/kiln/y", "tree/opt/z", "note"] {
            std::fs::write(context.path().join(file), file).unwrap();
        }
        let tree = Root::open(context.path()).unwrap();
        let from = SourceTree {
            view: TreeView::new(&tree, None, "context"),
            keep_owner: false,
        };
        let asked = std::cell::RefCell::new(Vec::new());
        let keep_out = |rel: &Path| {
            let kept = rel.starts_with("kiln");
            if kept {
                asked.borrow_mut().push(rel.to_path_buf());
            }
            kept
        };
        let request = |sources: &'static [&'static str], dest: &'static str| {
            let sources: Vec<CopySource> = sources
                .iter()
                .map(|s| CopySource::Path((*s).into()))
                .collect();
            copy(
                rootfs.path(),
                &from,
                &CopyRequest {
                    sources: &sources,
                    dest,
                    workdir: "/",
                    owner: None,
                    chmod: None,
                    exclude: &exclude_nothing,
                    keep_out: &keep_out,
                    parents: false,
                    unpack: false,
                },
            )
            .unwrap()
        };
        let written = request(&["tree"], "/");
        assert!(rootfs.path().join("opt/z").is_file());
        assert!(!rootfs.path().join("kiln").exists());
        assert!(
            written.iter().all(|p| !p.starts_with("kiln")),
            "{written:?}"
        );
        let mut asked_sorted = asked.borrow().clone();
        asked_sorted.sort();
        let expected: Vec<PathBuf> = ["kiln", "kiln/sub", "kiln/sub/x", "kiln/y"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(
            asked_sorted, expected,
            "each entry below a kept-out one is named"
        );
        assert!(request(&["note"], "/kiln/").is_empty());
        assert!(!rootfs.path().join("kiln").exists());
    }

    #[test]
    fn copies_directory_contents_and_files_with_owner_rules() {
        let context = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(context.path().join("dir/sub")).unwrap();
        std::fs::write(context.path().join("dir/sub/a"), "a").unwrap();
        std::fs::write(context.path().join("dir/b"), "b").unwrap();
        std::fs::write(context.path().join("one.txt"), "1").unwrap();
        std::os::unix::fs::symlink("b", context.path().join("dir/link")).unwrap();
        let ignore =
            kiln_context::DockerIgnore::parse("dir/b", Path::new(".dockerignore")).unwrap();
        let tree = Root::open(context.path()).unwrap();
        let from = SourceTree {
            view: TreeView::new(&tree, Some(&ignore), "context"),
            keep_owner: false,
        };
        let sources = [
            CopySource::Path("dir".into()),
            CopySource::Path("*.txt".into()),
        ];
        let written = copy(
            rootfs.path(),
            &from,
            &CopyRequest {
                sources: &sources,
                dest: "out/",
                workdir: "/w",
                owner: Some((7, 8)),
                chmod: None,
                exclude: &exclude_nothing,
                keep_out: &keep_out_nothing,
                parents: false,
                unpack: false,
            },
        )
        .unwrap();
        let out = rootfs.path().join("w/out");
        assert_eq!(std::fs::read_to_string(out.join("sub/a")).unwrap(), "a");
        assert!(!out.join("b").exists(), "excluded file copied");
        assert_eq!(
            std::fs::read_link(out.join("link")).unwrap(),
            Path::new("b")
        );
        assert_eq!(std::fs::read_to_string(out.join("one.txt")).unwrap(), "1");
        assert_eq!(std::fs::metadata(out.join("one.txt")).unwrap().uid(), 7);
        assert!(written.contains(&PathBuf::from("w")));
        assert!(written.contains(&PathBuf::from("w/out/sub/a")));

        let err = copy(
            rootfs.path(),
            &from,
            &CopyRequest {
                sources: &sources,
                dest: "single",
                workdir: "/",
                owner: None,
                chmod: None,
                exclude: &exclude_nothing,
                keep_out: &keep_out_nothing,
                parents: false,
                unpack: false,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("must be a directory"), "{err}");
        let missing = [CopySource::Path("nope".into())];
        let err = copy(
            rootfs.path(),
            &from,
            &CopyRequest {
                sources: &missing,
                dest: "/x",
                workdir: "/",
                owner: None,
                chmod: None,
                exclude: &exclude_nothing,
                keep_out: &keep_out_nothing,
                parents: false,
                unpack: false,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope: not found"), "{err}");
    }

    #[test]
    fn exclude_and_parents() {
        let context = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(context.path().join("src/a/deep")).unwrap();
        std::fs::write(context.path().join("src/a/x.txt"), "x").unwrap();
        std::fs::write(context.path().join("src/a/y.md"), "y").unwrap();
        std::fs::write(context.path().join("src/a/deep/z.txt"), "z").unwrap();
        std::fs::write(context.path().join("top.txt"), "t").unwrap();
        let tree = Root::open(context.path()).unwrap();
        let from = SourceTree {
            view: TreeView::new(&tree, None, "context"),
            keep_owner: false,
        };
        let md = |p: &Path| p.extension().is_some_and(|e| e == "md");
        let txt_at_top = |p: &Path| p == Path::new("top.txt");
        let run = |sources: &[&str], dest: &str, exclude: &dyn Fn(&Path) -> bool, parents| {
            let sources: Vec<_> = sources
                .iter()
                .map(|s| CopySource::Path((*s).into()))
                .collect();
            copy(
                rootfs.path(),
                &from,
                &CopyRequest {
                    sources: &sources,
                    dest,
                    workdir: "/",
                    owner: None,
                    chmod: None,
                    exclude,
                    parents,
                    unpack: false,
                    keep_out: &keep_out_nothing,
                },
            )
            .unwrap()
        };
        run(&["src"], "/e/", &md, false);
        assert!(rootfs.path().join("e/a/x.txt").is_file());
        assert!(
            !rootfs.path().join("e/a/y.md").exists(),
            "excluded below the source"
        );
        run(&["*.txt", "src"], "/w/", &txt_at_top, false);
        assert!(
            !rootfs.path().join("w/top.txt").exists(),
            "excluded wildcard match"
        );
        assert!(rootfs.path().join("w/a/x.txt").is_file());

        run(&["src/a/x.txt"], "/p", &exclude_nothing, true);
        assert!(rootfs.path().join("p/src/a/x.txt").is_file());
        run(&["./src/./a/deep"], "/q/", &exclude_nothing, true);
        assert!(rootfs.path().join("q/a/deep/z.txt").is_file());
        assert!(!rootfs.path().join("q/src").exists());
        run(&["src/./a/*.md"], "/r/", &exclude_nothing, true);
        assert!(rootfs.path().join("r/a/y.md").is_file());
    }
}

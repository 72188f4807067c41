//! COPY (and the local-file half of ADD): Docker's source and destination rules, applied
//! through [`kiln_fs::resolve::Root`] so nothing a source names can write outside the rootfs.
//!
//! Rules (Docker/BuildKit): a source directory copies its *contents*; a source file goes to
//! `dest/NAME` when `dest` ends with `/` or is an existing directory, else to `dest` itself;
//! several sources need a directory destination; relative destinations are under WORKDIR;
//! missing parents are created 0755, owned by the `--chown` owner or root; files from the build context are owned by
//! 0:0 unless `--chown` says otherwise, files from a stage or image keep their owners;
//! `--chmod` replaces the mode of everything copied; modes and mtimes are otherwise kept;
//! symlinks inside a copied tree are copied as symlinks, a source path that is itself a symlink
//! is followed.
//!
//! `--exclude` patterns (`.dockerignore` syntax) are matched, as BuildKit's copier does, against
//! paths relative to each copied source directory, and against wildcard matches relative to the
//! directory the wildcard expands in. `--parents` keeps each source's path below the context root
//! (or below a `/./` pivot in the source) under the destination. ADD's archive extraction is in
//! [`crate::archive`].

use std::ffi::CString;
use std::fs::Metadata;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use kiln_dockerfile::{Chmod, FileSource};
use kiln_fs::resolve::Root;

/// Where COPY reads from.
pub struct SourceTree<'a> {
    /// Host directory that source paths are relative to (context root or a stage rootfs).
    pub root: &'a Path,
    /// Whether a path (relative to `root`) may be copied; the build context's `.dockerignore`.
    pub include: &'a dyn Fn(&Path) -> bool,
    /// Keep source owners (stage and image sources) instead of 0:0 (context sources).
    pub keep_owner: bool,
}

/// What to copy where, after expansion.
pub struct CopyRequest<'a> {
    /// The sources as written.
    pub sources: &'a [FileSource],
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
}

/// An `exclude` for [`CopyRequest`] that leaves nothing out.
pub fn exclude_nothing(_: &Path) -> bool {
    false
}

/// Copies according to `request` into the rootfs `dest_root`; returns every path written or
/// created (relative to the rootfs), for the snapshotter.
pub fn copy(
    dest_root: &Path,
    from: &SourceTree<'_>,
    request: &CopyRequest<'_>,
) -> Result<Vec<PathBuf>, String> {
    let root = Root::open(dest_root).map_err(|e| e.to_string())?;
    let dest_abs = if request.dest.starts_with('/') {
        PathBuf::from(request.dest)
    } else {
        Path::new(request.workdir).join(request.dest)
    };
    let dest_rel = clean_relative(&dest_abs);
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
            FileSource::Heredoc { name, content } => items.push(Item::Inline {
                name: name.clone(),
                content: content.clone(),
            }),
            FileSource::Path(path) => {
                let matches = resolve_source(from, path)?;
                let base = has_wildcard(path).then(|| wildcard_base(path));
                let pivot = request.parents.then(|| parents_pivot(path));
                for rel in matches {
                    if let Some(base) = &base {
                        if let Ok(below) = rel.strip_prefix(base) {
                            if (request.exclude)(below) {
                                continue;
                            }
                        }
                    }
                    let keep = pivot
                        .as_ref()
                        .map(|pivot| rel.strip_prefix(pivot).unwrap_or(&rel).to_path_buf());
                    items.push(Item::Path { rel, keep });
                }
            }
        }
    }
    if items.len() > 1 && !dest_names_dir {
        return Err(format!(
            "when using COPY with more than one source file, the destination must be a directory and end with a /: {}",
            request.dest
        ));
    }

    let mut writer = Writer {
        root: &root,
        from,
        owner: request.owner,
        chmod: request.chmod,
        written: Vec::new(),
        linked: std::collections::HashMap::new(),
        exclude: request.exclude,
        exclude_base: PathBuf::new(),
        pending_files: Vec::new(),
        pending_dir_times: Vec::new(),
    };
    writer.ensure_dir_parents(&dest_rel)?;
    for item in items {
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
            Item::Path { rel, keep } => {
                let host = from.root.join(&rel);
                let meta =
                    std::fs::metadata(&host).map_err(|e| format!("{}: {e}", rel.display()))?;
                writer.exclude_base.clone_from(&rel);
                if let Some(keep) = keep {
                    // --parents: the kept path's directories take the metadata of their source
                    // directories when they are created.
                    let target = dest_rel.join(&keep);
                    let pivot = without_tail(&rel, &keep);
                    writer.make_source_dirs(&pivot, &keep, &dest_rel)?;
                    if meta.is_dir() {
                        writer.make_dir(&target, Some(&meta))?;
                        writer.copy_dir_contents(&rel, &target)?;
                    } else {
                        writer.copy_entry(&host, &meta, &target, true)?;
                    }
                } else if meta.is_dir() {
                    writer.make_dir(&dest_rel, Some(&meta))?;
                    writer.copy_dir_contents(&rel, &dest_rel)?;
                } else if let Some(format) = request
                    .unpack
                    .then(|| crate::archive::detect(&host))
                    .transpose()
                    .map_err(|e| format!("{}: {e}", rel.display()))?
                    .flatten()
                {
                    writer.extract(&host, format, &dest_rel)?;
                } else {
                    let name = rel.file_name().map(PathBuf::from).unwrap_or_default();
                    let target = if dest_names_dir {
                        dest_rel.join(name)
                    } else {
                        dest_rel.clone()
                    };
                    writer.ensure_dir_parents(&target)?;
                    writer.copy_entry(&host, &meta, &target, true)?;
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
/// with mode 0755 (WORKDIR); returns the directories created.
pub fn make_dirs(dest_root: &Path, rel: &Path, uid: u32, gid: u32) -> Result<Vec<PathBuf>, String> {
    let root = Root::open(dest_root).map_err(|e| e.to_string())?;
    let include = |_: &Path| true;
    let from = SourceTree {
        root: dest_root,
        include: &include,
        keep_owner: false,
    };
    let mut writer = Writer {
        root: &root,
        from: &from,
        owner: Some((uid, gid)),
        chmod: None,
        written: Vec::new(),
        linked: std::collections::HashMap::new(),
        exclude: &exclude_nothing,
        exclude_base: PathBuf::new(),
        pending_files: Vec::new(),
        pending_dir_times: Vec::new(),
    };
    let mut missing = Vec::new();
    for ancestor in rel.ancestors() {
        if ancestor.as_os_str().is_empty() || root.symlink_metadata(ancestor).is_ok() {
            break;
        }
        missing.push(ancestor.to_path_buf());
    }
    for dir in missing.into_iter().rev() {
        root.mkdir_all(&dir, 0o755)
            .map_err(|e| writer.err(&dir, e))?;
        writer.set_meta(&dir, uid, gid, Some(0o755), None)?;
        writer.written.push(dir);
    }
    Ok(writer.written)
}

enum Item {
    /// A source path relative to the source root; with `--parents`, the part of it kept under
    /// the destination.
    Path {
        rel: PathBuf,
        keep: Option<PathBuf>,
    },
    Inline {
        name: String,
        content: String,
    },
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
pub fn clean_relative(path: &Path) -> PathBuf {
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

/// Expands one source path (possibly with wildcards) to existing paths relative to the root.
fn resolve_source(from: &SourceTree<'_>, path: &str) -> Result<Vec<PathBuf>, String> {
    let rel = clean_relative(Path::new(path));
    if !has_wildcard(path) {
        let host = from.root.join(&rel);
        if std::fs::symlink_metadata(&host).is_err()
            || (!rel.as_os_str().is_empty() && !(from.include)(&rel))
        {
            return Err(format!(
                "{path}: not found in the build context or excluded by .dockerignore"
            ));
        }
        return Ok(vec![rel]);
    }
    let mut found = vec![PathBuf::new()];
    for component in rel.components() {
        let pattern = component.as_os_str().to_string_lossy().into_owned();
        let mut next = Vec::new();
        for dir in &found {
            if !has_wildcard(&pattern) {
                let candidate = dir.join(&pattern);
                if std::fs::symlink_metadata(from.root.join(&candidate)).is_ok() {
                    next.push(candidate);
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(from.root.join(dir)) else {
                continue;
            };
            let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
            names.sort();
            for name in names {
                if glob_match(&pattern, &name.to_string_lossy()) {
                    next.push(dir.join(name));
                }
            }
        }
        found = next;
    }
    found.retain(|p| (from.include)(p));
    if found.is_empty() {
        return Err(format!(
            "{path}: no source files were specified (nothing matches)"
        ));
    }
    Ok(found)
}

/// Go's `filepath.Match` for one path component: `*`, `?`, `[...]` classes with ranges and
/// `^`/`!` negation, and `\` escapes.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => {
                let Some(&c) = n.first() else { return false };
                let mut i = 1;
                let negate = matches!(p.get(1), Some('^') | Some('!'));
                if negate {
                    i += 1;
                }
                let mut matched = false;
                let mut first = true;
                while i < p.len() && (p[i] != ']' || first) {
                    first = false;
                    let mut lo = p[i];
                    if lo == '\\' && i + 1 < p.len() {
                        i += 1;
                        lo = p[i];
                    }
                    let mut hi = lo;
                    if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                        hi = p[i + 2];
                        i += 2;
                    }
                    if lo <= c && c <= hi {
                        matched = true;
                    }
                    i += 1;
                }
                if i >= p.len() {
                    return false;
                }
                matched != negate && go(&p[i + 1..], &n[1..])
            }
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && go(&p[2..], &n[1..]),
            Some(&c) => n.first() == Some(&c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

struct Writer<'a> {
    root: &'a Root,
    from: &'a SourceTree<'a>,
    owner: Option<(u32, u32)>,
    chmod: Option<&'a Chmod>,
    written: Vec<PathBuf>,
    /// Source (device, inode) of multiply-linked files already copied, to their destination, so
    /// hard links inside one copy stay hard links (BuildKit keeps them).
    linked: std::collections::HashMap<(u64, u64), PathBuf>,
    /// `--exclude`, matched against paths relative to `exclude_base`.
    exclude: &'a dyn Fn(&Path) -> bool,
    /// The source directory being copied.
    exclude_base: PathBuf,
    /// Regular files found while walking a source directory, copied together at the end by
    /// several threads: creating files and filling their pages is kernel work that scales
    /// with cores.
    pending_files: Vec<FileJob>,
    /// Directory times to set once every file below them exists (creating a file moves its
    /// directory's mtime), deepest first.
    pending_dir_times: Vec<(PathBuf, Metadata)>,
}

/// One regular file to copy: source, its metadata, destination, owner and mode.
struct FileJob {
    host: PathBuf,
    meta: Metadata,
    target: PathBuf,
    uid: u32,
    gid: u32,
    mode: u32,
}

impl Writer<'_> {
    fn err(&self, rel: &Path, e: impl std::fmt::Display) -> String {
        format!("/{}: {e}", rel.display())
    }

    /// Copies the deferred regular files on as many threads as there are cores, then sets the
    /// deferred directory times.
    fn flush(&mut self) -> Result<(), String> {
        let jobs = std::mem::take(&mut self.pending_files);
        let root = self.root;
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(jobs.len().max(1));
        let first_error: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    if let Err(e) = copy_regular(root, job) {
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
            self.set_meta(&dir, u32::MAX, u32::MAX, None, Some(&meta))?;
        }
        Ok(())
    }

    /// Creates missing parent directories of `target` (0755, owned by the `--chown` owner if one
    /// was given, as BuildKit's copy does, else root) and records them.
    fn ensure_dir_parents(&mut self, target: &Path) -> Result<(), String> {
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
            self.root
                .mkdir_all(&dir, 0o755)
                .map_err(|e| self.err(&dir, e))?;
            let (uid, gid) = self.owner.unwrap_or((0, 0));
            self.set_meta(&dir, uid, gid, Some(0o755), None)?;
            self.written.push(dir);
        }
        Ok(())
    }

    /// Creates `target` as a directory (if needed) with the owner and mode rules applied.
    fn make_dir(&mut self, target: &Path, source: Option<&Metadata>) -> Result<(), String> {
        if target.as_os_str().is_empty() {
            return Ok(());
        }
        self.ensure_dir_parents(target)?;
        let existed = matches!(self.root.symlink_metadata(target), Ok(m) if m.is_dir());
        if !existed {
            let _ = self.root.remove_all(target);
            self.root
                .mkdir_all(target, 0o755)
                .map_err(|e| self.err(target, e))?;
        }
        if let Some(meta) = source {
            let (uid, gid) = self.owner_of(meta);
            let mode = self.mode_of(meta.mode() & 0o7777, true);
            self.set_meta(target, uid, gid, Some(mode), None)?;
        } else if let Some((uid, gid)) = self.owner {
            self.set_meta(target, uid, gid, None, None)?;
        }
        self.written.push(target.to_path_buf());
        Ok(())
    }

    /// `--parents`: creates the missing parent directories of `keep` under `dest`, each with
    /// the mode and owner rules applied to its source directory below `pivot`.
    fn make_source_dirs(&mut self, pivot: &Path, keep: &Path, dest: &Path) -> Result<(), String> {
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
            let source = self.from.root.join(pivot).join(&partial);
            let meta =
                std::fs::metadata(&source).map_err(|e| format!("{}: {e}", source.display()))?;
            self.make_dir(&target, Some(&meta))?;
        }
        Ok(())
    }

    /// ADD: extracts the archive at `host` into the directory `dest`, which is created (with the
    /// usual owner rule) if missing and is `/` for every entry.
    fn extract(
        &mut self,
        host: &Path,
        format: crate::archive::ArchiveFormat,
        dest: &Path,
    ) -> Result<(), String> {
        self.ensure_dir_parents(&dest.join("_"))?;
        let fd = self
            .root
            .mkdir_all(dest, 0o755)
            .map_err(|e| self.err(dest, e))?;
        let dest_root = Root::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| self.err(dest, e))?;
        let changed = crate::archive::extract(&dest_root, host, format, self.owner)?;
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
            Some(Chmod::Symbolic(expr)) => apply_symbolic(expr, mode, is_dir),
        }
    }

    fn copy_dir_contents(&mut self, src_rel: &Path, dest_rel: &Path) -> Result<(), String> {
        let host_dir = self.from.root.join(src_rel);
        let mut entries: Vec<_> = std::fs::read_dir(&host_dir)
            .map_err(|e| format!("{}: {e}", src_rel.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        entries.sort();
        for name in entries {
            let child_src = src_rel.join(&name);
            if !(self.from.include)(&child_src) {
                continue;
            }
            if child_src
                .strip_prefix(&self.exclude_base)
                .is_ok_and(|below| (self.exclude)(below))
            {
                continue;
            }
            let host = self.from.root.join(&child_src);
            let meta = std::fs::symlink_metadata(&host)
                .map_err(|e| format!("{}: {e}", child_src.display()))?;
            let target = dest_rel.join(&name);
            if meta.is_dir() {
                self.make_dir(&target, Some(&meta))?;
                self.copy_dir_contents(&child_src, &target)?;
                self.pending_dir_times.push((target, meta));
            } else if meta.is_file() && meta.nlink() == 1 {
                let (uid, gid) = self.owner_of(&meta);
                let mode = self.mode_of(meta.permissions().mode() & 0o7777, false);
                self.pending_files.push(FileJob {
                    host,
                    meta,
                    target,
                    uid,
                    gid,
                    mode,
                });
            } else {
                self.copy_entry(&host, &meta, &target, false)?;
            }
        }
        Ok(())
    }

    /// Copies one non-directory entry. `follow` is set for a top-level source path.
    fn copy_entry(
        &mut self,
        host: &Path,
        meta: &Metadata,
        target: &Path,
        follow: bool,
    ) -> Result<(), String> {
        let link_meta =
            std::fs::symlink_metadata(host).map_err(|e| format!("{}: {e}", host.display()))?;
        if let Ok(existing) = self.root.symlink_metadata(target) {
            if existing.is_dir() && !meta.is_dir() {
                return Err(self.err(target, "cannot overwrite a directory with a non-directory"));
            }
            self.root
                .remove_all(target)
                .map_err(|e| self.err(target, e))?;
        }
        let (uid, gid) = self.owner_of(meta);
        if link_meta.file_type().is_symlink() && !follow {
            let link = std::fs::read_link(host).map_err(|e| format!("{}: {e}", host.display()))?;
            self.root
                .symlink(&link, target)
                .map_err(|e| self.err(target, e))?;
            self.set_meta(target, uid, gid, None, Some(&link_meta))?;
        } else if meta.is_file()
            && meta.nlink() > 1
            && self.linked.contains_key(&(meta.dev(), meta.ino()))
        {
            let first = self.linked[&(meta.dev(), meta.ino())].clone();
            self.root
                .hard_link(&first, target)
                .map_err(|e| self.err(target, e))?;
        } else if meta.is_file() {
            if meta.nlink() > 1 {
                self.linked
                    .insert((meta.dev(), meta.ino()), target.to_path_buf());
            }
            let mut input =
                std::fs::File::open(host).map_err(|e| format!("{}: {e}", host.display()))?;
            let mode = self.mode_of(meta.permissions().mode() & 0o7777, false);
            let mut output = self
                .root
                .create(target, 0o600)
                .map_err(|e| self.err(target, e))?;
            io::copy(&mut input, &mut output).map_err(|e| self.err(target, e))?;
            drop(output);
            self.set_meta(target, uid, gid, Some(mode), Some(meta))?;
        } else {
            return Err(format!(
                "{}: only regular files, directories and symlinks can be copied",
                host.display()
            ));
        }
        self.written.push(target.to_path_buf());
        Ok(())
    }

    fn write_bytes(&mut self, target: &Path, content: &[u8], mode: u32) -> Result<(), String> {
        if let Ok(existing) = self.root.symlink_metadata(target) {
            if existing.is_dir() {
                return Err(self.err(target, "cannot overwrite a directory with a file"));
            }
            self.root
                .remove_all(target)
                .map_err(|e| self.err(target, e))?;
        }
        let mut output = self
            .root
            .create(target, 0o600)
            .map_err(|e| self.err(target, e))?;
        io::Write::write_all(&mut output, content).map_err(|e| self.err(target, e))?;
        drop(output);
        let (uid, gid) = self.owner.unwrap_or((0, 0));
        let mode = self.mode_of(mode, false);
        self.set_meta(target, uid, gid, Some(mode), None)?;
        self.written.push(target.to_path_buf());
        Ok(())
    }

    /// Sets owner (skipped when `uid == u32::MAX`), mode (after chown, which clears setuid
    /// bits) and mtime (from `times_of`) of `rel` without following a final symlink.
    fn set_meta(
        &self,
        rel: &Path,
        uid: u32,
        gid: u32,
        mode: Option<u32>,
        times_of: Option<&Metadata>,
    ) -> Result<(), String> {
        set_meta_at(self.root, rel, uid, gid, mode, times_of)
    }
}

/// Copies one deferred regular file (a new or replaced destination) with its owner, mode
/// and times.
fn copy_regular(root: &Root, job: &FileJob) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("/{}: {e}", job.target.display());
    if let Ok(existing) = root.symlink_metadata(&job.target) {
        if existing.is_dir() {
            return Err(err(&"cannot overwrite a directory with a non-directory"));
        }
        root.remove_all(&job.target).map_err(|e| err(&e))?;
    }
    let mut input =
        std::fs::File::open(&job.host).map_err(|e| format!("{}: {e}", job.host.display()))?;
    let mut output = root.create(&job.target, 0o600).map_err(|e| err(&e))?;
    io::copy(&mut input, &mut output).map_err(|e| err(&e))?;
    drop(output);
    set_meta_at(
        root,
        &job.target,
        job.uid,
        job.gid,
        Some(job.mode),
        Some(&job.meta),
    )
}

/// Sets owner (skipped when `uid == u32::MAX`), mode (after chown, which clears setuid bits)
/// and mtime (from `times_of`) of `rel` under `root` without following a final symlink.
fn set_meta_at(
    root: &Root,
    rel: &Path,
    uid: u32,
    gid: u32,
    mode: Option<u32>,
    times_of: Option<&Metadata>,
) -> Result<(), String> {
    {
        let err = |e: &dyn std::fmt::Display| format!("/{}: {e}", rel.display());
        let parent = root.resolve_parent(rel).map_err(|e| err(&e))?;
        let dirfd = parent.dir().as_raw_fd();
        let name = CString::new(parent.name().as_bytes()).map_err(|e| err(&e))?;
        let os_err = |what: &str| err(&format!("{what}: {}", io::Error::last_os_error()));
        if uid != u32::MAX {
            // SAFETY: dirfd is a live descriptor owned by `parent`; name is NUL-terminated.
            if unsafe { libc::fchownat(dirfd, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }
                != 0
            {
                return Err(os_err("chown"));
            }
        }
        if let Some(mode) = mode {
            // SAFETY: as above; fchmodat never follows into another directory than dirfd.
            if unsafe { libc::fchmodat(dirfd, name.as_ptr(), mode, 0) } != 0 {
                return Err(os_err("chmod"));
            }
        }
        if let Some(meta) = times_of {
            let times = [
                libc::timespec {
                    tv_sec: meta.atime(),
                    tv_nsec: meta.atime_nsec(),
                },
                libc::timespec {
                    tv_sec: meta.mtime(),
                    tv_nsec: meta.mtime_nsec(),
                },
            ];
            // SAFETY: as above; `times` is a valid two-element array.
            if unsafe {
                libc::utimensat(
                    dirfd,
                    name.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            } != 0
            {
                return Err(os_err("utimensat"));
            }
        }
        Ok(())
    }
}

/// Applies a symbolic chmod expression (`u+x`, `go=r`, `a-w,u+s`, `+X`) to `mode`, as chmod(1)
/// does without a umask.
pub fn apply_symbolic(expr: &str, mode: u32, is_dir: bool) -> u32 {
    let mut mode = mode & 0o7777;
    for clause in expr.split(',') {
        let who_end = clause.find(['+', '-', '=']).unwrap_or(clause.len());
        let who = &clause[..who_end];
        let mut mask = 0u32;
        for c in who.chars() {
            mask |= match c {
                'u' => 0o4700,
                'g' => 0o2070,
                'o' => 0o1007,
                'a' => 0o7777,
                _ => 0,
            };
        }
        if who.is_empty() {
            mask = 0o7777;
        }
        let mut rest = &clause[who_end..];
        while let Some(op) = rest.chars().next() {
            let perms_end = rest[1..]
                .find(['+', '-', '='])
                .map_or(rest.len(), |i| i + 1);
            let perms = &rest[1..perms_end];
            let mut bits = 0u32;
            for c in perms.chars() {
                bits |= match c {
                    'r' => 0o444,
                    'w' => 0o222,
                    'x' => 0o111,
                    'X' if is_dir || mode & 0o111 != 0 => 0o111,
                    's' => 0o6000,
                    't' => 0o1000,
                    'u' => copy_class(mode, 6),
                    'g' => copy_class(mode, 3),
                    'o' => copy_class(mode, 0),
                    _ => 0,
                };
            }
            let bits = bits & mask;
            match op {
                '+' => mode |= bits,
                '-' => mode &= !bits,
                _ => mode = (mode & !(mask & 0o7777)) | bits,
            }
            rest = &rest[perms_end..];
        }
    }
    mode
}

/// The rwx bits of one class (`shift` 6 user, 3 group, 0 other) replicated to all classes.
fn copy_class(mode: u32, shift: u32) -> u32 {
    let rwx = (mode >> shift) & 0o7;
    rwx << 6 | rwx << 3 | rwx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_filepath_match_semantics() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(!glob_match("*.txt", "a.txt.bak"));
        assert!(glob_match("file?.md", "file1.md"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[^a-c]x", "bx"));
        assert!(glob_match("\\*", "*"));
        assert!(!glob_match("[", "["));
    }

    #[test]
    fn symbolic_modes_apply_like_chmod() {
        assert_eq!(apply_symbolic("u+x", 0o644, false), 0o744);
        assert_eq!(apply_symbolic("go=r", 0o777, false), 0o744);
        assert_eq!(apply_symbolic("a-w", 0o666, false), 0o444);
        assert_eq!(apply_symbolic("+X", 0o644, true), 0o755);
        assert_eq!(apply_symbolic("+X", 0o644, false), 0o644);
        assert_eq!(apply_symbolic("u=rwx,g=rx,o=", 0o000, false), 0o750);
        assert_eq!(apply_symbolic("g=u", 0o640, false), 0o660);
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
        let include = |p: &Path| !p.ends_with("b");
        let from = SourceTree {
            root: context.path(),
            include: &include,
            keep_owner: false,
        };
        let sources = [
            FileSource::Path("dir".into()),
            FileSource::Path("*.txt".into()),
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
                parents: false,
                unpack: false,
            },
        )
        .unwrap_err();
        assert!(err.contains("must be a directory"), "{err}");
        let missing = [FileSource::Path("nope".into())];
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
                parents: false,
                unpack: false,
            },
        )
        .unwrap_err();
        assert!(err.contains("nope: not found"), "{err}");
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
        let include = |_: &Path| true;
        let from = SourceTree {
            root: context.path(),
            include: &include,
            keep_owner: false,
        };
        let md = |p: &Path| p.extension().is_some_and(|e| e == "md");
        let txt_at_top = |p: &Path| p == Path::new("top.txt");
        let run = |sources: &[&str], dest: &str, exclude: &dyn Fn(&Path) -> bool, parents| {
            let sources: Vec<_> = sources
                .iter()
                .map(|s| FileSource::Path((*s).into()))
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

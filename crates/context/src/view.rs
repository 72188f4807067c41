//! A tree as COPY/ADD see it: a directory opened as a [`Root`], filtered by `.dockerignore`.
//!
//! Source paths are resolved the way BuildKit resolves them: relative to the tree's root (a
//! leading `/` and any `..` are clamped at the root), wildcards per path element with Go's
//! `filepath.Match`, symlinks on a source path followed (the last element too) but only ever
//! inside the root, through kiln-fs's [`Root`] (an absolute link target or a `..` starts again
//! from the tree's root, never from the host's), and ignored paths invisible. A walk below a
//! source lists symlinks as symlinks and never follows them.
//!
//! The same rules serve the build context ([`BuildContext::view`], with its ignore file) and
//! the trees COPY reads from other stages and images ([`TreeView::new`] without one), so a
//! cache key and the copy it stands for always see the same entries.

use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_fs::resolve::{Root, RootError};
use tempfile::TempDir;

use crate::dockerignore::DockerIgnore;
use crate::error::{ContextError, Result};
use crate::hash::{ContentDigest, ContentHasher, HashOptions, HashedTree, TreeEntry};
use crate::pattern::{clean, go_match, has_meta};

/// One file, directory or link of a tree.
#[derive(Debug, Clone)]
pub struct ContextEntry {
    rel: String,
    metadata: Metadata,
}

impl ContextEntry {
    /// The slash-separated path relative to the tree's root (`.` for the root), with no
    /// symlink among its directories.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// [`rel`](Self::rel) as a path to hand to the tree's [`Root`] (empty for the root).
    pub fn rel_path(&self) -> &Path {
        Path::new(if self.rel == "." { "" } else { &self.rel })
    }

    /// The entry's `lstat` metadata (a symlink is described as a symlink).
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Whether the entry is a directory (not a symlink to one).
    pub fn is_dir(&self) -> bool {
        self.metadata.is_dir()
    }
}

/// A COPY/ADD source resolved in a tree.
#[derive(Debug, Clone)]
pub struct SourceMatch {
    matched: String,
    entry: ContextEntry,
}

impl SourceMatch {
    /// The root-relative path as matched by the pattern (before following symlinks); its
    /// last element is the name a COPY into a directory gives the copy.
    pub fn matched(&self) -> &str {
        &self.matched
    }

    /// What the source resolves to after following symlinks (inside the root).
    pub fn entry(&self) -> &ContextEntry {
        &self.entry
    }
}

/// A tree seen through COPY/ADD's rules: a [`Root`] and, for the build context, its ignore
/// rules. Everything it reads goes through the root.
#[derive(Debug, Clone, Copy)]
pub struct TreeView<'a> {
    root: &'a Root,
    ignore: Option<&'a DockerIgnore>,
    description: &'a str,
}

impl<'a> TreeView<'a> {
    /// A view of `root` with optional ignore rules; `description` names the tree in errors
    /// (`"context /src/app"`, `"stage 0"`).
    pub fn new(root: &'a Root, ignore: Option<&'a DockerIgnore>, description: &'a str) -> Self {
        TreeView {
            root,
            ignore,
            description,
        }
    }

    /// The root every path of this view is resolved in.
    pub fn root(&self) -> &'a Root {
        self.root
    }

    /// Whether the root-relative, slash-separated `rel` can be seen: it is not ignored, or it
    /// is a directory with an exception beneath it (`.dockerignore`'s `!` rules).
    pub fn visible(&self, rel: &str, is_dir: bool) -> bool {
        let Some(ignore) = self.ignore else {
            return true;
        };
        rel.is_empty()
            || rel == "."
            || !ignore.is_excluded(rel)
            || (is_dir && ignore.has_exception_under(rel))
    }

    /// Resolves one COPY/ADD source (`app/*.go`, `.`, `/etc/conf`, `dir/`) to the entries it
    /// names, sorted. A source without wildcards that does not exist, is excluded, or leads
    /// through a symlink to something that is not inside the root, is a
    /// [`ContextError::NotFound`]; a wildcard that matches nothing gives an empty list (Docker
    /// then reports "no source files were specified").
    pub fn resolve_sources(&self, source: &str) -> Result<Vec<SourceMatch>> {
        let cleaned = clean(&format!("/{source}"));
        let rel = cleaned.trim_start_matches('/');
        if rel.is_empty() {
            let metadata = self.lstat(Path::new(""))?;
            return Ok(vec![SourceMatch {
                matched: ".".to_owned(),
                entry: ContextEntry {
                    rel: ".".to_owned(),
                    metadata,
                },
            }]);
        }
        let elements: Vec<&str> = rel.split('/').collect();
        for element in &elements {
            if has_meta(element) {
                go_match(element, "").map_err(|e| ContextError::SourcePattern {
                    pattern: source.to_owned(),
                    reason: e.to_string(),
                })?;
            }
        }
        let mut matches = Vec::new();
        self.expand(String::new(), &elements, &mut matches)?;
        if matches.is_empty() && !has_meta(rel) {
            return Err(ContextError::NotFound {
                path: rel.to_owned(),
            });
        }
        matches.sort_by(|a, b| a.matched.cmp(&b.matched));
        Ok(matches)
    }

    fn expand(&self, prefix: String, elements: &[&str], out: &mut Vec<SourceMatch>) -> Result<()> {
        let Some((element, rest)) = elements.split_first() else {
            return Ok(());
        };
        let candidates: Vec<String> = if has_meta(element) {
            let Some(dir) = self.resolve_in_root(&prefix)? else {
                return Ok(());
            };
            let names = match self.root.read_dir(&dir) {
                Ok(names) => names,
                // Nothing to match in a missing directory or in a file.
                Err(e) if e.is_not_found() || e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Ok(())
                }
                Err(e) => return Err(self.error(e)),
            };
            names
                .into_iter()
                .map(|name| name.to_string_lossy().into_owned())
                .filter(|name| go_match(element, name).unwrap_or(false))
                .collect()
        } else {
            vec![(*element).to_owned()]
        };
        for name in candidates {
            let matched = join_rel(&prefix, &name);
            let Some(real) = self.resolve_in_root(&matched)? else {
                continue;
            };
            let metadata = match self.root.symlink_metadata(&real) {
                Ok(metadata) => metadata,
                // A dangling link, or one whose target exists only outside the root.
                Err(e) if e.is_not_found() || e.raw_os_error() == Some(libc::ENOTDIR) => continue,
                Err(e) => return Err(self.error(e)),
            };
            if !rest.is_empty() {
                if metadata.is_dir() {
                    self.expand(matched, rest, out)?;
                }
                continue;
            }
            let real_rel = real.to_string_lossy().into_owned();
            if !self.visible(&real_rel, metadata.is_dir()) {
                continue;
            }
            out.push(SourceMatch {
                matched,
                entry: ContextEntry {
                    rel: if real_rel.is_empty() {
                        ".".to_owned()
                    } else {
                        real_rel
                    },
                    metadata,
                },
            });
        }
        Ok(())
    }

    /// Resolves a root-relative path following symlinks inside the root (see
    /// [`Root::resolve`]): the relative path it leads to (empty for the root), or `None` when
    /// a directory on the way does not exist there.
    pub fn resolve_in_root(&self, rel: &str) -> Result<Option<PathBuf>> {
        match self.root.resolve(rel, true) {
            Ok(resolved) => Ok(Some(resolved)),
            Err(e) if e.is_not_found() || e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Every entry below a resolved directory source, honouring the ignore rules: excluded
    /// files are left out, an excluded directory is entered only when an exception names
    /// something beneath it and is then listed only if something inside it is included.
    /// Depth first, names sorted bytewise; symlinks are listed, not followed.
    pub fn walk(&self, dir: &ContextEntry) -> Result<Vec<ContextEntry>> {
        let mut out = Vec::new();
        if dir.is_dir() {
            let rel = if dir.rel == "." { "" } else { dir.rel.as_str() };
            self.walk_dir(rel, &mut out)?;
        }
        Ok(out)
    }

    /// [`walk`](Self::walk) below the resolved path `rel` (no symlink among its components),
    /// whose `lstat` is `metadata`.
    pub fn walk_at(&self, rel: &Path, metadata: Metadata) -> Result<Vec<ContextEntry>> {
        let rel = rel.to_string_lossy();
        self.walk(&ContextEntry {
            rel: if rel.is_empty() {
                ".".to_owned()
            } else {
                rel.into_owned()
            },
            metadata,
        })
    }

    fn walk_dir(&self, rel: &str, out: &mut Vec<ContextEntry>) -> Result<bool> {
        let names = self.root.read_dir(rel).map_err(|e| self.error(e))?;
        let start = out.len();
        for name in names {
            let child_rel = join_rel(rel, &String::from_utf8_lossy(name.as_bytes()));
            let metadata = self.lstat(Path::new(&child_rel))?;
            let excluded = !self.visible(&child_rel, false);
            if metadata.is_dir() {
                if excluded && !self.visible(&child_rel, true) {
                    continue;
                }
                let position = out.len();
                out.push(ContextEntry {
                    rel: child_rel.clone(),
                    metadata,
                });
                let kept_children = self.walk_dir(&child_rel, out)?;
                if excluded && !kept_children {
                    out.truncate(position);
                }
            } else if !excluded {
                out.push(ContextEntry {
                    rel: child_rel,
                    metadata,
                });
            }
        }
        Ok(out.len() > start)
    }

    /// The content hash of a COPY/ADD's sources (in the order given), for its cache key.
    /// Each source contributes its matched path and, for a directory, every visible entry
    /// beneath it with paths relative to the source.
    pub fn hash_sources(
        &self,
        hasher: &ContentHasher,
        sources: &[SourceMatch],
        options: HashOptions,
    ) -> Result<ContentDigest> {
        let mut trees = Vec::with_capacity(sources.len());
        for source in sources {
            let top = source.entry();
            let mut entries = vec![TreeEntry {
                rel: b".".to_vec(),
                path: top.rel_path().to_path_buf(),
                metadata: top.metadata.clone(),
            }];
            for entry in self.walk(top)? {
                let rel = Path::new(&entry.rel)
                    .strip_prefix(top.rel_path())
                    .map(|p| p.as_os_str().as_bytes().to_vec())
                    .unwrap_or_else(|_| entry.rel.clone().into_bytes());
                entries.push(TreeEntry {
                    rel,
                    path: entry.rel_path().to_path_buf(),
                    metadata: entry.metadata,
                });
            }
            trees.push(HashedTree {
                label: source.matched.clone().into_bytes(),
                entries,
            });
        }
        hasher.hash_trees(self.root, &trees, options)
    }

    fn lstat(&self, rel: &Path) -> Result<Metadata> {
        self.root.symlink_metadata(rel).map_err(|e| self.error(e))
    }

    fn error(&self, error: RootError) -> ContextError {
        ContextError::Contained {
            source_name: self.description.to_owned(),
            error,
        }
    }
}

/// A materialised build context: its root directory and ignore rules. Owns the directory of a
/// remote context, which is removed when this value is dropped.
#[derive(Debug)]
pub struct BuildContext {
    root: Root,
    ignore: DockerIgnore,
    description: String,
    _workspace: Option<TempDir>,
}

impl BuildContext {
    /// A context rooted at the directory `root` with the given ignore rules.
    pub fn new(root: &Path, ignore: DockerIgnore) -> Result<Self> {
        Self::with_workspace(root, ignore, format!("context {}", root.display()), None)
    }

    pub(crate) fn with_workspace(
        root: &Path,
        ignore: DockerIgnore,
        description: String,
        workspace: Option<TempDir>,
    ) -> Result<Self> {
        // The context directory itself is the user's choice, so a symlink naming it is
        // followed on the host once, here; everything inside it is resolved in its root.
        let canonical = std::fs::canonicalize(root)
            .map_err(|e| ContextError::io(&description, "resolve", root, e))?;
        if !canonical.is_dir() {
            return Err(ContextError::NotADirectory {
                source_name: description,
                path: root.to_owned(),
            });
        }
        let root = Root::open(&canonical).map_err(|error| ContextError::Contained {
            source_name: description.clone(),
            error,
        })?;
        Ok(BuildContext {
            root,
            ignore,
            description,
            _workspace: workspace,
        })
    }

    /// The same context with other ignore rules (the ones its own files hold, once it can be
    /// read).
    pub fn with_ignore(self, ignore: DockerIgnore) -> Self {
        BuildContext { ignore, ..self }
    }

    /// The context directory (canonical) on the host. Read what is inside it through
    /// [`tree`](Self::tree), never by joining paths to this one.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The context directory as a [`Root`]: the only way to open anything inside it.
    pub fn tree(&self) -> &Root {
        &self.root
    }

    /// The context as COPY/ADD see it: its root and its ignore rules.
    pub fn view(&self) -> TreeView<'_> {
        TreeView::new(&self.root, Some(&self.ignore), &self.description)
    }

    /// The ignore rules in force.
    pub fn ignore(&self) -> &DockerIgnore {
        &self.ignore
    }

    /// Where the context came from, for messages (credentials redacted).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// [`TreeView::resolve_sources`] on [`view`](Self::view).
    pub fn resolve_sources(&self, source: &str) -> Result<Vec<SourceMatch>> {
        self.view().resolve_sources(source)
    }

    /// [`TreeView::resolve_in_root`] on [`view`](Self::view).
    pub fn resolve_in_root(&self, rel: &str) -> Result<Option<PathBuf>> {
        self.view().resolve_in_root(rel)
    }

    /// [`TreeView::walk`] on [`view`](Self::view).
    pub fn walk(&self, dir: &ContextEntry) -> Result<Vec<ContextEntry>> {
        self.view().walk(dir)
    }

    /// [`TreeView::hash_sources`] on [`view`](Self::view).
    pub fn hash_sources(
        &self,
        hasher: &ContentHasher,
        sources: &[SourceMatch],
        options: HashOptions,
    ) -> Result<ContentDigest> {
        self.view().hash_sources(hasher, sources, options)
    }
}

fn join_rel(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

//! The build context as COPY/ADD see it: a directory, filtered by `.dockerignore`.
//!
//! Source paths are resolved the way BuildKit resolves them: relative to the context root
//! (a leading `/` and any `..` are clamped at the root), wildcards per path element with Go's
//! `filepath.Match`, symlinks followed but scoped to the root (an absolute link target or a
//! `..` is resolved against the context root, never the host), and ignored paths invisible.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use tempfile::TempDir;

use crate::dockerignore::DockerIgnore;
use crate::error::{ContextError, Result};
use crate::hash::{ContentDigest, ContentHasher, HashOptions, HashedTree, TreeEntry};
use crate::pattern::{clean, go_match, has_meta};

/// How many symlinks one resolution may follow before it is considered a loop (Linux's limit).
const MAX_SYMLINKS: usize = 40;

/// One file, directory or link of the context.
#[derive(Debug, Clone)]
pub struct ContextEntry {
    rel: String,
    path: PathBuf,
    metadata: Metadata,
}

impl ContextEntry {
    /// The slash-separated path relative to the context root (`.` for the root).
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// The entry's location on disk.
    pub fn path(&self) -> &Path {
        &self.path
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

/// A COPY/ADD source resolved in the context.
#[derive(Debug, Clone)]
pub struct SourceMatch {
    matched: String,
    entry: ContextEntry,
}

impl SourceMatch {
    /// The context-relative path as matched by the pattern (before following symlinks); its
    /// last element is the name a COPY into a directory gives the copy.
    pub fn matched(&self) -> &str {
        &self.matched
    }

    /// What the source resolves to after following symlinks (inside the context).
    pub fn entry(&self) -> &ContextEntry {
        &self.entry
    }
}

/// A materialised build context: its root directory and ignore rules. Owns the directory of a
/// remote context, which is removed when this value is dropped.
#[derive(Debug)]
pub struct BuildContext {
    root: PathBuf,
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
        let canonical = std::fs::canonicalize(root)
            .map_err(|e| ContextError::io(&description, "resolve", root, e))?;
        if !canonical.is_dir() {
            return Err(ContextError::NotADirectory {
                source_name: description,
                path: root.to_owned(),
            });
        }
        Ok(BuildContext {
            root: canonical,
            ignore,
            description,
            _workspace: workspace,
        })
    }

    /// The context directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The ignore rules in force.
    pub fn ignore(&self) -> &DockerIgnore {
        &self.ignore
    }

    /// Where the context came from, for messages (credentials redacted).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Resolves one COPY/ADD source (`app/*.go`, `.`, `/etc/conf`, `dir/`) to the context
    /// entries it names, sorted. A source without wildcards that does not exist, or is
    /// excluded, is a [`ContextError::NotFound`]; a wildcard that matches nothing gives an
    /// empty list (Docker then reports "no source files were specified").
    pub fn resolve_sources(&self, source: &str) -> Result<Vec<SourceMatch>> {
        let cleaned = clean(&format!("/{source}"));
        let rel = cleaned.trim_start_matches('/');
        if rel.is_empty() {
            let entry = self.entry_at("", self.root.clone())?;
            return Ok(vec![SourceMatch {
                matched: ".".to_owned(),
                entry,
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
            let (_, dir) = self.resolve_in_root(&prefix)?;
            let listing = match std::fs::read_dir(&dir) {
                Ok(listing) => listing,
                // Nothing to match in a missing directory or in a file.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(ContextError::io(&self.description, "list", &dir, e)),
            };
            let mut names = Vec::new();
            for entry in listing {
                let entry =
                    entry.map_err(|e| ContextError::io(&self.description, "list", &dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if go_match(element, &name).unwrap_or(false) {
                    names.push(name);
                }
            }
            names.sort();
            names
        } else {
            vec![(*element).to_owned()]
        };
        for name in candidates {
            let matched = join_rel(&prefix, &name);
            let (real_rel, real_path) = self.resolve_in_root(&matched)?;
            let Ok(metadata) = std::fs::symlink_metadata(&real_path) else {
                continue;
            };
            if !rest.is_empty() {
                if metadata.is_dir() {
                    self.expand(matched, rest, out)?;
                }
                continue;
            }
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
                    path: real_path,
                    metadata,
                },
            });
        }
        Ok(())
    }

    /// Whether a path is visible through the ignore rules (an excluded directory is, when an
    /// exception names something inside it).
    fn visible(&self, rel: &str, is_dir: bool) -> bool {
        rel.is_empty()
            || !self.ignore.is_excluded(rel)
            || (is_dir && self.ignore.has_exception_under(rel))
    }

    fn entry_at(&self, rel: &str, path: PathBuf) -> Result<ContextEntry> {
        let metadata = std::fs::symlink_metadata(&path)
            .map_err(|e| ContextError::io(&self.description, "stat", &path, e))?;
        Ok(ContextEntry {
            rel: if rel.is_empty() {
                ".".to_owned()
            } else {
                rel.to_owned()
            },
            path,
            metadata,
        })
    }

    /// Resolves a context-relative path following symlinks, scoped to the root: `..` stops at
    /// the root and an absolute link target starts again from the root. Returns the resolved
    /// relative path (empty for the root) and its location on disk; the path need not exist.
    pub fn resolve_in_root(&self, rel: &str) -> Result<(String, PathBuf)> {
        let mut pending: VecDeque<OsString> = Path::new(rel)
            .components()
            .filter_map(component_name)
            .collect();
        let mut resolved: Vec<OsString> = Vec::new();
        let mut followed = 0;
        while let Some(name) = pending.pop_front() {
            if name == ".." {
                resolved.pop();
                continue;
            }
            let mut candidate = self.root.clone();
            candidate.extend(&resolved);
            candidate.push(&name);
            match std::fs::symlink_metadata(&candidate) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    followed += 1;
                    if followed > MAX_SYMLINKS {
                        return Err(ContextError::EscapesContext {
                            path: rel.to_owned(),
                        });
                    }
                    let target = std::fs::read_link(&candidate).map_err(|e| {
                        ContextError::io(&self.description, "read link", &candidate, e)
                    })?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    for (index, part) in target.components().filter_map(component_name).enumerate()
                    {
                        pending.insert(index, part);
                    }
                }
                _ => resolved.push(name),
            }
        }
        let mut path = self.root.clone();
        path.extend(&resolved);
        let rel = resolved
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        Ok((rel, path))
    }

    /// Every entry below a resolved directory source, honouring the ignore rules: excluded
    /// files are left out, an excluded directory is entered only when an exception names
    /// something beneath it and is then listed only if something inside it is included.
    /// Depth first, names sorted bytewise; symlinks are listed, not followed.
    pub fn walk(&self, dir: &ContextEntry) -> Result<Vec<ContextEntry>> {
        let mut out = Vec::new();
        if dir.is_dir() {
            let rel = if dir.rel == "." { "" } else { dir.rel.as_str() };
            self.walk_dir(rel, &dir.path, &mut out)?;
        }
        Ok(out)
    }

    fn walk_dir(&self, rel: &str, dir: &Path, out: &mut Vec<ContextEntry>) -> Result<bool> {
        let mut names: Vec<OsString> = std::fs::read_dir(dir)
            .and_then(|listing| listing.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|e| ContextError::io(&self.description, "list", dir, e))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let start = out.len();
        for name in names {
            let child_rel = join_rel(rel, &name.to_string_lossy());
            let path = dir.join(&name);
            let metadata = std::fs::symlink_metadata(&path)
                .map_err(|e| ContextError::io(&self.description, "stat", &path, e))?;
            let excluded = self.ignore.is_excluded(&child_rel);
            if metadata.is_dir() {
                if excluded && !self.ignore.has_exception_under(&child_rel) {
                    continue;
                }
                let position = out.len();
                out.push(ContextEntry {
                    rel: child_rel.clone(),
                    path: path.clone(),
                    metadata,
                });
                let kept_children = self.walk_dir(&child_rel, &path, out)?;
                if excluded && !kept_children {
                    out.truncate(position);
                }
            } else if !excluded {
                out.push(ContextEntry {
                    rel: child_rel,
                    path,
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
            let root = source.entry();
            let mut entries = vec![TreeEntry {
                rel: b".".to_vec(),
                path: root.path.clone(),
                metadata: root.metadata.clone(),
            }];
            for entry in self.walk(root)? {
                let rel = entry
                    .path
                    .strip_prefix(&root.path)
                    .map(|p| p.as_os_str().as_bytes().to_vec())
                    .unwrap_or_else(|_| entry.rel.clone().into_bytes());
                entries.push(TreeEntry {
                    rel,
                    path: entry.path,
                    metadata: entry.metadata,
                });
            }
            trees.push(HashedTree {
                label: source.matched.clone().into_bytes(),
                entries,
            });
        }
        hasher.hash_trees(&trees, options)
    }
}

fn component_name(component: Component<'_>) -> Option<OsString> {
    match component {
        Component::Normal(name) => Some(name.to_owned()),
        Component::ParentDir => Some(OsString::from_vec(b"..".to_vec())),
        Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
    }
}

fn join_rel(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

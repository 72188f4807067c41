//! The copy operation: files from the build context, another stage or an image ([`tree`]),
//! archives extracted into the destination ([`archive`]), URLs downloaded and git
//! repositories checked out ([`fetch`]), all copied with Docker's rules.
//!
//! Its key covers the operation, the content of what it reads from a tree (a content hash of
//! context sources, the final key of a source stage, the manifest digest of a source image)
//! and, for each remote source, what pins its content (the `--checksum`, the server's
//! validators or the downloaded content, the commit a git ref names).
//!
//! Remote sources are all fetched, and checked against their checksums, before the rootfs is
//! touched. A copy with `link` is made in an empty tree of its own, so that its layer depends
//! on nothing below it (BuildKit's `--link`: the destination is not resolved against the
//! stage, and the layer is reused when only what is below changes).

pub(crate) mod archive;
mod chmod;
pub(crate) mod fetch;
mod files;
pub(crate) mod tree;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use kiln_cache::{CopyInput, RemoteSource, RemoteValidator, SourceContent, StepInput};
use kiln_context::{DockerIgnore, HashOptions, TreeView};
use kiln_fs::resolve::Root;
use kiln_plan::{Copy, CopySource, Source};

use self::tree::{CopyRequest, SourceTree};
use super::KeyInputs;
use crate::error::BuildError;
use crate::events::BuildEvent;
use crate::inplace::{self, LeftOut};
use crate::remote::UrlPin;
use crate::stage::StepContext;

/// What a copy observes; `None` when a source cannot be pinned or resolved (the step itself
/// then runs and reports the real error).
pub(crate) fn key_input(copy: &Copy, inputs: &KeyInputs<'_>) -> Option<StepInput> {
    let local: Vec<String> = copy
        .sources
        .iter()
        .filter_map(|s| match s {
            CopySource::Path(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let content = match &copy.from {
        None if local.is_empty() => SourceContent::None,
        None => context_content(inputs, &local)?,
        Some(Source::Stage(i)) => SourceContent::Stage((inputs.stage_key)(*i)?),
        Some(Source::Image(image)) => SourceContent::Image(inputs.remote.image(image)?),
        Some(Source::Local(dir)) => local_content(inputs, dir, &local)?,
    };
    let mut remote = Vec::new();
    for source in &copy.sources {
        let validator = match source {
            CopySource::Git(url) => RemoteValidator::GitCommit(inputs.remote.git(url)?.id),
            CopySource::Url(url) => match &copy.checksum {
                Some(checksum) => RemoteValidator::Checksum(checksum.clone()),
                None => match inputs.remote.url(url)? {
                    UrlPin::Validators(validators) => RemoteValidator::Http {
                        etag: validators.etag,
                        last_modified: validators.last_modified,
                    },
                    UrlPin::Downloaded(downloaded) => RemoteValidator::Content(downloaded.digest),
                },
            },
            CopySource::Path(_) | CopySource::Inline { .. } | CopySource::Symlink { .. } => {
                continue
            }
        };
        let (CopySource::Git(url) | CopySource::Url(url)) = source else {
            continue;
        };
        remote.push(RemoteSource {
            url: url.clone(),
            validator,
        });
    }
    Some(StepInput::Copy(CopyInput {
        copy: copy.clone(),
        content,
        remote,
    }))
}

/// The content hash of context sources (names, types, modes, link targets, contents); `None`
/// when one does not resolve (the step itself then fails with the real error).
pub(crate) fn context_content(inputs: &KeyInputs<'_>, sources: &[String]) -> Option<SourceContent> {
    let mut matches = Vec::new();
    for source in sources {
        matches.extend(inputs.context.resolve_sources(source).ok()?);
    }
    let digest = inputs
        .context
        .hash_sources(
            inputs.hasher,
            &matches,
            HashOptions {
                include_owner: false,
            },
        )
        .ok()?;
    Some(SourceContent::Tree(digest.0))
}

/// The content hash of sources in a local directory the front end named (its own files).
fn local_content(inputs: &KeyInputs<'_>, dir: &str, sources: &[String]) -> Option<SourceContent> {
    let root = Root::open(dir).ok()?;
    let view = TreeView::new(&root, None, dir);
    let mut matches = Vec::new();
    for source in sources {
        matches.extend(view.resolve_sources(source).ok()?);
    }
    let digest = view
        .hash_sources(inputs.hasher, &matches, HashOptions::default())
        .ok()?;
    Some(SourceContent::Tree(digest.0))
}

/// What a copy wrote: the paths (relative to the root the copy wrote into, as resolved there),
/// and whether every download came with the validators its URL was keyed by (a download that
/// did not must not be cached under the key).
pub(crate) struct Copied {
    pub(crate) written: Vec<PathBuf>,
    pub(crate) as_keyed: bool,
}

/// Runs `copy` into `dest_root` (the stage rootfs, or an empty tree for a linked copy). Owner
/// names are looked up in the stage rootfs.
pub(crate) fn execute(
    step: &StepContext<'_>,
    copy: &Copy,
    dest_root: &Path,
) -> Result<Copied, BuildError> {
    let owner = step.chown_ids(copy.chown.as_deref())?;
    let workdir = step.working_dir();
    let excluded = DockerIgnore::parse(&copy.exclude.join("\n"), Path::new("--exclude"))
        .map_err(|e| step.fail(e))?;
    let exclude = |rel: &Path| excluded.is_excluded(&rel.to_string_lossy());
    let local: Vec<CopySource> = copy
        .sources
        .iter()
        .filter(|s| !s.is_remote())
        .cloned()
        .collect();
    let remote: Vec<&CopySource> = copy.sources.iter().filter(|s| s.is_remote()).collect();
    if !remote.is_empty() {
        check_remote_sources(step, copy)?;
    }
    // Every download completes (and passes its checksum) before the rootfs is touched.
    let fetched = fetch_all(step, copy, &remote)?;
    // In place, the copy leaves the paths the build ignores alone (the Kiln dir, mounts) and
    // says which ones it did not write.
    let shared = step.shared;
    let ignore = (shared.mode == kiln_sandbox::Mode::InPlace && dest_root == Path::new("/"))
        .then(|| {
            inplace::ignore_set(&inplace::ignore_options(
                &shared.options,
                shared.context.root(),
            ))
        })
        .transpose()?;
    let left_out = RefCell::new(LeftOut::default());
    let keep_out = |rel: &Path| {
        let ignored = ignore.as_ref().is_some_and(|set| set.is_ignored(rel));
        if let (true, Some(set)) = (ignored, &ignore) {
            left_out.borrow_mut().note(set, rel, true);
        }
        ignored
    };
    let mut written = Vec::new();
    let result = (|| {
        if !local.is_empty() {
            let request = CopyRequest {
                sources: &local,
                dest: &copy.dest,
                workdir: &workdir,
                owner,
                chmod: copy.chmod.as_ref(),
                exclude: &exclude,
                parents: copy.parents,
                unpack: copy.unpack,
                keep_out: &keep_out,
            };
            written.extend(copy_local(step, copy.from.as_ref(), dest_root, &request)?);
        }
        // Downloads and checkouts are copied as context files are: owned by root or
        // --chown, with --chmod, never extracted.
        let git_dir =
            DockerIgnore::parse(".git", Path::new("--keep-git-dir")).map_err(|e| step.fail(e))?;
        for item in &fetched.items {
            // The repository's `.git` stays out unless --keep-git-dir (BuildKit).
            let ignore = (item.git && !copy.keep_git_dir).then_some(&git_dir);
            let root = Root::open(&item.dir).map_err(|e| step.fail(e))?;
            let description = item.dir.display().to_string();
            let sources = [CopySource::Path(item.name.clone())];
            let request = CopyRequest {
                sources: &sources,
                dest: &copy.dest,
                workdir: &workdir,
                owner,
                chmod: copy.chmod.as_ref(),
                exclude: &tree::exclude_nothing,
                parents: false,
                unpack: false,
                keep_out: &keep_out,
            };
            let tree = SourceTree {
                view: TreeView::new(&root, ignore, &description),
                keep_owner: false,
            };
            written.extend(tree::copy(dest_root, &tree, &request).map_err(|e| step.fail(e))?);
        }
        Ok(())
    })();
    fetched.remove();
    for found in left_out.into_inner().warnings(&shared.options) {
        shared.emit(BuildEvent::Warning {
            message: format!(
                "{}: in-place mode: the copy did not write {found}, which the build leaves alone: \
                 they are not in the image",
                step.at.location()
            ),
        });
    }
    result.map(|()| Copied {
        written,
        as_keyed: fetched.as_keyed,
    })
}

/// The rules of remote sources: `--checksum` only with URLs, several sources only into a
/// directory.
fn check_remote_sources(step: &StepContext<'_>, copy: &Copy) -> Result<(), BuildError> {
    let urls = copy
        .sources
        .iter()
        .filter(|s| matches!(s, CopySource::Url(_)))
        .count();
    if copy.checksum.is_some() && (urls == 0 || urls != copy.sources.len()) {
        return Err(step.fail("ADD --checksum is only supported for HTTP(S) sources"));
    }
    if copy.sources.len() > 1 && !copy.dest.ends_with('/') {
        return Err(step.fail(format!(
            "when using ADD with more than one source file, the destination must be a directory and end with a /: {}",
            copy.dest
        )));
    }
    Ok(())
}

/// Copies the tree sources of `request` from the context, a stage or an image.
fn copy_local(
    step: &StepContext<'_>,
    from: Option<&Source>,
    dest_root: &Path,
    request: &CopyRequest<'_>,
) -> Result<Vec<PathBuf>, BuildError> {
    let shared = step.shared;
    let written = match from {
        None => {
            let tree = SourceTree {
                view: shared.context.view(),
                keep_owner: false,
            };
            tree::copy(dest_root, &tree, request)
        }
        Some(Source::Stage(i)) => {
            let root = Root::open(shared.stage_rootfs(*i)?).map_err(|e| step.fail(e))?;
            let description = format!("stage {i}");
            let tree = SourceTree {
                view: TreeView::new(&root, None, &description),
                keep_owner: true,
            };
            tree::copy(dest_root, &tree, request)
        }
        Some(Source::Image(image)) => {
            let image_tree = shared.image_tree(image)?;
            let root = Root::open(&image_tree.root).map_err(|e| step.fail(e))?;
            let tree = SourceTree {
                view: TreeView::new(&root, None, image),
                keep_owner: true,
            };
            tree::copy(dest_root, &tree, request)
        }
        Some(Source::Local(dir)) => {
            let root = Root::open(dir).map_err(|e| step.fail(e))?;
            let tree = SourceTree {
                view: TreeView::new(&root, None, dir),
                keep_owner: false,
            };
            tree::copy(dest_root, &tree, request)
        }
    };
    written.map_err(|e| step.fail(e))
}

/// A remote source fetched into a directory of its own, ready to copy from.
struct FetchedItem {
    dir: PathBuf,
    name: String,
    git: bool,
    /// Whether the directory was made for this step and goes when the step is done; a
    /// download the cache made while keying stays, for any later step with the same URL.
    remove_after: bool,
    /// A checkout's directory, removed when dropped.
    _checkout: Option<tempfile::TempDir>,
}

struct Fetched {
    items: Vec<FetchedItem>,
    as_keyed: bool,
}

impl Fetched {
    fn remove(&self) {
        for item in self.items.iter().filter(|i| i.remove_after) {
            let _ = std::fs::remove_dir_all(&item.dir);
        }
    }
}

/// Downloads every URL and checks out every repository of the copy, in order, before anything
/// is written. A URL the cache pinned by content is not fetched again; a repository is
/// checked out at the commit the step was keyed by.
fn fetch_all(
    step: &StepContext<'_>,
    copy: &Copy,
    remote: &[&CopySource],
) -> Result<Fetched, BuildError> {
    let shared = step.shared;
    let mut fetched = Fetched {
        items: Vec::new(),
        as_keyed: true,
    };
    for (i, source) in remote.iter().enumerate() {
        let item = match source {
            CopySource::Url(url) => fetch_url(step, copy, url, i, &mut fetched.as_keyed),
            CopySource::Git(repository) => check_out(step, repository),
            _ => continue,
        };
        match item {
            Ok(item) => fetched.items.push(item),
            Err(e) => {
                fetched.remove();
                return Err(e);
            }
        }
    }
    let _ = shared;
    Ok(fetched)
}

fn fetch_url(
    step: &StepContext<'_>,
    copy: &Copy,
    url: &str,
    index: usize,
    as_keyed: &mut bool,
) -> Result<FetchedItem, BuildError> {
    let shared = step.shared;
    let pin = copy
        .checksum
        .is_none()
        .then(|| shared.remote.url(url))
        .flatten();
    if let Some(UrlPin::Downloaded(pinned)) = &pin {
        return Ok(kept(&pinned.path));
    }
    let dir = shared
        .work_dir
        .join(format!("add-{}-{}-{index}", step.stage, step.step));
    std::fs::create_dir_all(&dir).map_err(BuildError::io(&dir))?;
    let downloaded = shared
        .block_on(fetch::download(url, copy.checksum.as_deref(), &dir))
        .and_then(|downloaded| downloaded.map_err(|e| step.fail(format!("ADD failed: {e}"))))
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
    if let Some(UrlPin::Validators(keyed)) = &pin {
        *as_keyed &= downloaded.validators == *keyed;
    }
    Ok(FetchedItem {
        remove_after: true,
        ..kept(&downloaded.path)
    })
}

/// A download at `file` that the step leaves in place.
fn kept(file: &Path) -> FetchedItem {
    FetchedItem {
        dir: file.parent().unwrap_or(Path::new("/")).to_path_buf(),
        name: file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned(),
        git: false,
        remove_after: false,
        _checkout: None,
    }
}

/// Checks out the git repository `source` names, at the commit the step was keyed by (or the
/// one its ref names now, without the cache).
fn check_out(step: &StepContext<'_>, source: &str) -> Result<FetchedItem, BuildError> {
    let shared = step.shared;
    let dir = tempfile::Builder::new()
        .prefix("add-git-")
        .tempdir_in(&shared.work_dir)
        .map_err(BuildError::io(&shared.work_dir))?;
    let checked_out = (|| {
        let repo = kiln_context::GitRepository::parse(source)?;
        let commit = match shared.remote.git(source) {
            Some(pinned) => pinned,
            None => repo.resolve()?,
        };
        repo.checkout(&commit, dir.path())?;
        Ok::<_, kiln_context::ContextError>(repo.subdir().to_path_buf())
    })();
    let subdir = checked_out.map_err(|e| step.fail(format!("ADD failed: {e}")))?;
    Ok(FetchedItem {
        dir: dir.path().to_path_buf(),
        name: subdir.display().to_string(),
        git: true,
        remove_after: false,
        _checkout: Some(dir),
    })
}

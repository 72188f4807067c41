//! Where a build context comes from.
//!
//! Each kind of `--context` value is one implementation of [`ContextSource`]. Whatever the
//! kind, [`ContextSource::materialize`] yields a directory (remote kinds download or clone into
//! a fresh directory under the caller's work directory), so the rest of the engine only ever
//! sees a directory.

mod dir;
mod git;
mod git_repository;
mod gix_remote;
mod http;
mod tarball;

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use tempfile::TempDir;

pub use dir::DirSource;
pub use git::{GitOptions, GitSource};
pub use git_repository::{GitCommit, GitRepository};
pub use http::HttpTarballSource;
pub use tarball::TarballSource;

use crate::error::{ContextError, Result};
use crate::redact::{redact_urls, Redactor};

/// One kind of build context source.
pub trait ContextSource: Send + Sync {
    /// A short description for messages, e.g. `git context git://host/repo.git#main`, with any
    /// credentials redacted.
    fn describe(&self) -> String;

    /// Makes the context available as a directory, downloading or cloning into a new
    /// directory under `work_dir` when the source is remote.
    fn materialize<'a>(&'a self, work_dir: &'a Path) -> BoxFuture<'a, Result<Materialized>>;
}

/// A context made available as a directory. For remote sources the directory is owned by this
/// value and removed when it is dropped.
#[derive(Debug)]
pub struct Materialized {
    root: PathBuf,
    workspace: Option<TempDir>,
}

impl Materialized {
    /// A directory the caller owns (local contexts): nothing is removed on drop.
    pub fn borrowed(root: PathBuf) -> Self {
        Materialized {
            root,
            workspace: None,
        }
    }

    /// A directory created for this build inside `workspace`, removed on drop.
    pub fn owned(root: PathBuf, workspace: TempDir) -> Self {
        Materialized {
            root,
            workspace: Some(workspace),
        }
    }

    /// The context directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Keeps the directory on disk after this value is dropped; returns its path.
    pub fn keep(self) -> PathBuf {
        if let Some(workspace) = self.workspace {
            let _ = workspace.keep();
        }
        self.root
    }

    pub(crate) fn into_parts(self) -> (PathBuf, Option<TempDir>) {
        (self.root, self.workspace)
    }
}

/// Options that affect how remote sources are fetched.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// kaniko's `--git` options.
    pub git: GitOptions,
    /// PEM files with extra CA certificates trusted for HTTPS downloads and HTTPS git.
    pub ca_certificates: Vec<PathBuf>,
}

/// Parses a `--context` value and returns the source it names:
/// a plain path or `dir://path`, `tar://path`, `git://host/repo.git#ref#commit`,
/// `http(s)://...git[#ref[#commit]]`, or `http(s)://...` (a tarball).
pub fn open_source(spec: &str, options: &SourceOptions) -> Result<Box<dyn ContextSource>> {
    let invalid = |reason: &str| ContextError::InvalidSpec {
        spec: redact_urls(spec),
        reason: reason.to_owned(),
    };
    if spec.trim().is_empty() {
        return Err(invalid("empty context"));
    }
    let Some((scheme, rest)) = spec.split_once("://") else {
        return Ok(Box::new(DirSource::new(PathBuf::from(spec))));
    };
    match scheme {
        "dir" => {
            if rest.is_empty() {
                return Err(invalid("dir:// needs a path"));
            }
            Ok(Box::new(DirSource::new(PathBuf::from(rest))))
        }
        "tar" => {
            if rest.is_empty() {
                return Err(invalid("tar:// needs a path"));
            }
            Ok(Box::new(TarballSource::new(PathBuf::from(rest))))
        }
        "git" => Ok(Box::new(GitSource::parse(spec, options)?)),
        "http" | "https" => {
            let location = spec.split('#').next().unwrap_or(spec);
            let path_part = location.split('?').next().unwrap_or(location);
            if path_part.ends_with(".git") || path_part.ends_with(".git/") {
                Ok(Box::new(GitSource::parse(spec, options)?))
            } else {
                if spec.contains('#') {
                    return Err(invalid("a tarball URL cannot have a '#' fragment"));
                }
                Ok(Box::new(HttpTarballSource::new(
                    spec.to_owned(),
                    options.ca_certificates.clone(),
                )))
            }
        }
        "gs" | "s3" => Err(invalid(
            "cloud storage contexts (gs://, s3://) are not supported; download the tarball and use tar://",
        )),
        other => Err(invalid(&format!("unknown context scheme {other:?}"))),
    }
}

/// Selects `sub_path` (kaniko's `--context-sub-path`) inside `root`. The sub-path must name a
/// directory inside the context; symlinks on the way are followed inside the context.
pub fn select_sub_path(root: &Path, sub_path: &str, source_name: &str) -> Result<PathBuf> {
    let reject = |reason: &str| ContextError::SubPath {
        source_name: source_name.to_owned(),
        sub_path: sub_path.to_owned(),
        reason: reason.to_owned(),
    };
    let cleaned = crate::pattern::clean(sub_path);
    let relative = cleaned.trim_start_matches('/');
    if relative == ".." || relative.starts_with("../") {
        return Err(reject("it points outside the build context"));
    }
    let canonical_root = std::fs::canonicalize(root)
        .map_err(|e| ContextError::io(source_name, "resolve", root, e))?;
    let tree =
        kiln_fs::resolve::Root::open(&canonical_root).map_err(|error| ContextError::Contained {
            source_name: source_name.to_owned(),
            error,
        })?;
    let resolved = match tree.resolve(relative, true) {
        Ok(resolved) => resolved,
        Err(e) if e.is_not_found() => return Err(reject("no such directory in the build context")),
        Err(error) => {
            return Err(ContextError::Contained {
                source_name: source_name.to_owned(),
                error,
            })
        }
    };
    match tree.symlink_metadata(&resolved) {
        Ok(meta) if meta.is_dir() => Ok(canonical_root.join(resolved)),
        Ok(_) => Err(reject("not a directory")),
        Err(e) if e.is_not_found() => Err(reject("no such directory in the build context")),
        Err(error) => Err(ContextError::Contained {
            source_name: source_name.to_owned(),
            error,
        }),
    }
}

/// Creates a fresh directory for one remote source under `work_dir`.
pub(crate) fn new_workspace(work_dir: &Path, prefix: &str, source_name: &str) -> Result<TempDir> {
    std::fs::create_dir_all(work_dir)
        .map_err(|e| ContextError::io(source_name, "create directory", work_dir, e))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(work_dir)
        .map_err(|e| ContextError::io(source_name, "create directory in", work_dir, e))
}

/// Runs blocking work (extraction, cloning) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    source_name: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) => Err(ContextError::Archive {
            source_name: source_name.to_owned(),
            error: std::io::Error::other(format!("worker thread failed: {join}")),
        }),
    }
}

/// The redactor for a source's URL; a shorthand used by the remote sources.
pub(crate) fn redactor(url: &str) -> Redactor {
    Redactor::for_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describe(spec: &str) -> String {
        open_source(spec, &SourceOptions::default())
            .unwrap()
            .describe()
    }

    #[test]
    fn specs_pick_the_right_source() {
        assert_eq!(describe("/some/dir"), "directory context /some/dir");
        assert_eq!(describe("dir://ctx"), "directory context ctx");
        assert_eq!(describe("tar://ctx.tar.gz"), "tarball context ctx.tar.gz");
        assert_eq!(
            describe("git://h/r.git#refs/heads/main#abc"),
            "git context git://h/r.git#refs/heads/main#abc"
        );
        assert_eq!(
            describe("https://u:p@h/r.git#v1"),
            "git context https://***@h/r.git#v1"
        );
        assert_eq!(
            describe("https://u:p@h/ctx.tar.gz"),
            "https tarball context https://***@h/ctx.tar.gz"
        );
    }

    #[test]
    fn bad_specs_are_rejected_without_secrets() {
        for spec in [
            "",
            "ftp://x/y",
            "s3://bucket/x",
            "https://a:secret@h/x.tgz#frag",
        ] {
            let err = open_source(spec, &SourceOptions::default())
                .err()
                .unwrap()
                .to_string();
            assert!(!err.contains("secret"), "{err}");
        }
    }
}

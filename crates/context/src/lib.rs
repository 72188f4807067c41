//! Build contexts for Kiln.
//!
//! A context is what kaniko's `--context` names: a local directory (a path or `dir://path`),
//! a local tarball (`tar://path`, plain or gzip), a git repository (`git://host/repo.git#ref`
//! or an `http(s)://` URL ending in `.git`, with kaniko's `--git` options) or an `http(s)://`
//! tarball. Each kind is one [`ContextSource`]; every one of them materialises as a directory
//! (remote ones under a caller-given work directory), optionally narrowed by
//! `--context-sub-path`, so the engine only ever deals with a [`BuildContext`]: a directory
//! plus `.dockerignore` rules (with Docker's per-Dockerfile `NAME.dockerignore`).
//!
//! [`BuildContext::resolve_sources`] and [`BuildContext::walk`] give COPY/ADD what they may
//! see, and [`BuildContext::hash_sources`] the content hash their cache keys need. Those are
//! blocking filesystem calls (hashing fans out over rayon's pool): async callers run them with
//! `tokio::task::spawn_blocking`. Only [`open_context`] is async, for the network sources.
//!
//! ```no_run
//! # async fn example() -> Result<(), kiln_context::ContextError> {
//! use kiln_context::{open_context, ContextHasher, ContextOptions, HashOptions};
//! let options = ContextOptions::new("/tmp/kiln-work");
//! let context = open_context("git://127.0.0.1:9418/app.git#main", &options).await?;
//! let sources = context.resolve_sources("src/*.rs")?;
//! let key_part = context.hash_sources(&ContextHasher::new(), &sources, HashOptions::default())?;
//! # let _ = key_part; Ok(()) }
//! ```

#![warn(clippy::undocumented_unsafe_blocks)]

mod archive;
pub mod dockerignore;
mod error;
pub mod hash;
pub mod pattern;
pub mod redact;
pub mod source;
mod tls;
mod view;

use std::path::{Path, PathBuf};

pub use dockerignore::DockerIgnore;
pub use error::{ContextError, Result};
pub use hash::{ContentDigest, ContentHasher as ContextHasher, HashOptions, HashedTree, TreeEntry};
pub use source::{
    open_source, select_sub_path, ContextSource, DirSource, GitCommit, GitOptions, GitRepository,
    GitSource, HttpTarballSource, Materialized, SourceOptions, TarballSource,
};
pub use view::{BuildContext, ContextEntry, SourceMatch, TreeView};

/// Everything [`open_context`] needs besides the `--context` value.
#[derive(Debug, Clone)]
pub struct ContextOptions {
    /// Directory under which remote contexts are downloaded or cloned.
    pub work_dir: PathBuf,
    /// kaniko's `--context-sub-path`: a directory inside the context to use as its root.
    pub sub_path: Option<String>,
    /// The Dockerfile, used to find its `NAME.dockerignore`; a relative path is taken
    /// relative to the context root (after the sub-path).
    pub dockerfile: Option<PathBuf>,
    /// How remote sources are fetched.
    pub source: SourceOptions,
}

impl ContextOptions {
    /// Options with a work directory and everything else at kaniko's defaults.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        ContextOptions {
            work_dir: work_dir.into(),
            sub_path: None,
            dockerfile: None,
            source: SourceOptions::default(),
        }
    }
}

/// Opens the context named by a `--context` value: materialises it as a directory, applies
/// the sub-path and loads the ignore rules that apply to the Dockerfile.
pub async fn open_context(spec: &str, options: &ContextOptions) -> Result<BuildContext> {
    let source = open_source(spec, &options.source)?;
    let description = source.describe();
    let materialized = source.materialize(&options.work_dir).await?;
    let (root, workspace) = materialized.into_parts();
    let root = match options.sub_path.as_deref().filter(|s| !s.is_empty()) {
        Some(sub_path) => select_sub_path(&root, sub_path, &description)?,
        None => root,
    };
    let context =
        BuildContext::with_workspace(&root, DockerIgnore::empty(), description, workspace)?;
    let dockerfile = options.dockerfile.as_deref().map(|path| {
        if path.is_absolute() {
            path.to_owned()
        } else {
            context.root().join(path)
        }
    });
    let ignore = DockerIgnore::load(context.tree(), dockerfile.as_deref())?;
    Ok(context.with_ignore(ignore))
}

/// Opens a local directory as a context with the ignore rules for `dockerfile` (see
/// [`DockerIgnore::load`]); a shorthand for library users that already have a directory.
pub fn open_dir(root: &Path, dockerfile: Option<&Path>) -> Result<BuildContext> {
    let context = BuildContext::new(root, DockerIgnore::empty())?;
    let ignore = DockerIgnore::load(context.tree(), dockerfile)?;
    Ok(context.with_ignore(ignore))
}

//! A local directory context (a plain path or `dir://path`).

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::{ContextSource, Materialized};
use crate::error::{ContextError, Result};

/// A directory on the local filesystem, used in place.
#[derive(Debug, Clone)]
pub struct DirSource {
    path: PathBuf,
}

impl DirSource {
    /// A context at `path` (relative paths are relative to the current directory).
    pub fn new(path: PathBuf) -> Self {
        DirSource { path }
    }
}

impl ContextSource for DirSource {
    fn describe(&self) -> String {
        format!("directory context {}", self.path.display())
    }

    fn materialize<'a>(&'a self, _work_dir: &'a Path) -> BoxFuture<'a, Result<Materialized>> {
        Box::pin(async move {
            let name = self.describe();
            let root = std::fs::canonicalize(&self.path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    ContextError::NotADirectory {
                        source_name: name.clone(),
                        path: self.path.clone(),
                    }
                } else {
                    ContextError::io(&name, "resolve", &self.path, e)
                }
            })?;
            if !root.is_dir() {
                return Err(ContextError::NotADirectory {
                    source_name: name,
                    path: self.path.clone(),
                });
            }
            Ok(Materialized::borrowed(root))
        })
    }
}

//! A local tarball context (`tar://path`), plain or gzip-compressed.

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::{blocking, new_workspace, ContextSource, Materialized};
use crate::archive::{decompress_auto, extract_tar};
use crate::error::{ContextError, Result};

/// A tar archive on the local filesystem, extracted into the work directory.
#[derive(Debug, Clone)]
pub struct TarballSource {
    path: PathBuf,
}

impl TarballSource {
    /// A context read from the archive at `path`.
    pub fn new(path: PathBuf) -> Self {
        TarballSource { path }
    }
}

impl ContextSource for TarballSource {
    fn describe(&self) -> String {
        format!("tarball context {}", self.path.display())
    }

    fn materialize<'a>(&'a self, work_dir: &'a Path) -> BoxFuture<'a, Result<Materialized>> {
        Box::pin(async move {
            let name = self.describe();
            let workspace = new_workspace(work_dir, "context-tar-", &name)?;
            let dest = workspace.path().to_path_buf();
            let path = self.path.clone();
            let worker_name = name.clone();
            blocking(&name, move || {
                let file = std::fs::File::open(&path)
                    .map_err(|e| ContextError::io(&worker_name, "open", &path, e))?;
                let reader = decompress_auto(std::io::BufReader::new(file)).map_err(|error| {
                    ContextError::Archive {
                        source_name: worker_name.clone(),
                        error,
                    }
                })?;
                extract_tar(reader, &dest, &worker_name)
            })
            .await?;
            let root = workspace.path().to_path_buf();
            Ok(Materialized::owned(root, workspace))
        })
    }
}

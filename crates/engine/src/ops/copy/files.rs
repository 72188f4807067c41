//! Writing one copied entry: a regular file's bytes, owner, mode and times, through the
//! destination's [`Root`].

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_fs::resolve::Root;
use rustix::fs::Timespec;

use super::tree::{dest_error, CopyError};

/// One regular file to copy: where it is in the source tree, its metadata, destination, owner
/// and mode.
pub(super) struct FileJob {
    pub(super) source: PathBuf,
    pub(super) meta: Metadata,
    pub(super) target: PathBuf,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mode: u32,
}

/// Copies one regular file of the source tree `source` into `root`, with its owner, mode and
/// times, replacing what was at the destination.
pub(super) fn copy_regular(root: &Root, source: &Root, job: &FileJob) -> Result<(), CopyError> {
    if let Ok(existing) = root.symlink_metadata(&job.target) {
        if existing.is_dir() {
            return Err(CopyError::OverwriteDirectory(job.target.clone()));
        }
        root.remove_all(&job.target)
            .map_err(dest_error(&job.target))?;
    }
    let mut input = source.open_file(&job.source).map_err(CopyError::Read)?;
    let mut output = root
        .create(&job.target, 0o600)
        .map_err(dest_error(&job.target))?;
    io::copy(&mut input, &mut output).map_err(|source| CopyError::Write {
        path: job.target.clone(),
        source,
    })?;
    drop(output);
    set_meta_at(
        root,
        &job.target,
        Some((job.uid, job.gid)),
        Some(job.mode),
        Some(&job.meta),
    )
}

/// Sets owner, mode (after the owner, since chown clears setuid bits) and access and
/// modification times (from `times_of`) of `rel` under `root`, without following a final
/// symlink.
pub(super) fn set_meta_at(
    root: &Root,
    rel: &Path,
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
    times_of: Option<&Metadata>,
) -> Result<(), CopyError> {
    if let Some((uid, gid)) = owner {
        root.set_owner(rel, uid, gid).map_err(dest_error(rel))?;
    }
    if let Some(mode) = mode {
        root.set_mode(rel, mode).map_err(dest_error(rel))?;
    }
    if let Some(meta) = times_of {
        let accessed = Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        };
        let modified = Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        };
        root.set_times(rel, accessed, modified)
            .map_err(dest_error(rel))?;
    }
    Ok(())
}

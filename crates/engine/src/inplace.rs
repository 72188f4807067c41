//! In-place mode (kaniko's model): the stage rootfs is `/` of the container Kiln runs in.
//!
//! Before each stage everything in `/` except the ignored paths is deleted and the stage's base
//! is unpacked into `/`; stages run one after another. The ignored paths are never deleted,
//! overwritten by a base layer, or snapshotted: Kiln's own directory (where the executor
//! binary, the blob store and the work directory live), `/proc`, `/sys`, `/dev`, every mount
//! point of the container (volumes, Secrets, service-account tokens, the build context when it
//! is mounted), the runtime's `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`, the debug
//! image's `/busybox`, `/var/run`
//! under `--ignore-var-run`, the `--ignore-path`s, a local build context, and the output files.
//! A stage that a later one needs (`COPY --from`, `RUN --mount=from=`) is materialised from
//! its layers into the work directory before the next stage wipes `/`.

use std::path::{Path, PathBuf};

use kiln_fs::snapshot::{IgnoreOptions, IgnoreSet, Index};

use kiln_fs::resolve::Root;

use crate::base::{self, ImageLayer};
use crate::error::BuildError;
use crate::options::BuildOptions;

/// Paths of the container that belong to neither the image nor the build: the runtime's files
/// in `/etc`, and the debug image's `/busybox`, whose shell CI systems run the build from.
const CONTAINER_PATHS: [&str; 4] = [
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/hostname",
    "/busybox",
];

/// Refuses in-place mode outside a container unless `force` (`--force`), since it deletes `/`.
pub fn check_allowed(force: bool) -> Result<(), BuildError> {
    if force || kiln_sandbox::in_container() {
        return Ok(());
    }
    Err(BuildError::Options(
        "in-place mode builds in / and deletes everything else there, but this does not look like a container; \
         use --mode chroot, or pass --force if you really mean to build in this machine's /"
            .into(),
    ))
}

/// The paths an in-place build never deletes, overwrites or snapshots, for `options` and the
/// build context directory `context_root`.
pub fn ignore_options(options: &BuildOptions, context_root: &Path) -> IgnoreOptions {
    let mut extra: Vec<PathBuf> = options.snapshot.ignore_paths.clone();
    extra.extend(CONTAINER_PATHS.iter().map(PathBuf::from));
    let mut keep = |path: &Path| {
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(path)
        };
        // Both spellings: `/kaniko` may be a symlink to `/kiln` (Kiln's image), and the
        // snapshotter compares paths as written, not resolved.
        if let Ok(real) = std::fs::canonicalize(&absolute) {
            extra.push(real);
        }
        extra.push(absolute);
    };
    keep(&options.kiln_dir);
    keep(context_root);
    let output = &options.output;
    for file in [
        &output.oci_layout_path,
        &output.tar_path,
        &output.digest_file,
        &output.image_name_with_digest_file,
        &output.image_name_tag_with_digest_file,
    ]
    .into_iter()
    .flatten()
    {
        keep(file);
    }
    if let Some(file) = &options.benchmark_file {
        keep(file);
    }
    for secret in &options.secrets {
        if let crate::options::SecretSource::File(file) = &secret.source {
            keep(file);
        }
    }
    IgnoreOptions {
        system_paths: true,
        var_run: options.snapshot.ignore_var_run,
        mount_points: true,
        extra,
    }
}

/// Resolves `options` for `/`.
pub fn ignore_set(options: &IgnoreOptions) -> Result<IgnoreSet, BuildError> {
    IgnoreSet::resolve(Path::new("/"), options).map_err(|source| BuildError::Io {
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })
}

/// Deletes everything under `root` except the paths `ignore` names (relative to `root`) and
/// the directories leading to them. Never follows symlinks and never enters an ignored path,
/// so mounts (all of which are ignored in in-place mode) are not crossed.
pub fn wipe(root: &Path, ignore: &IgnoreSet) -> Result<(), BuildError> {
    let kept: Vec<PathBuf> = ignore.paths().map(Path::to_path_buf).collect();
    let tree = Root::open(root).map_err(|e| BuildError::image("image", e))?;
    wipe_dir(&tree, Path::new(""), ignore, &kept)
}

fn wipe_dir(
    root: &Root,
    rel: &Path,
    ignore: &IgnoreSet,
    kept: &[PathBuf],
) -> Result<(), BuildError> {
    let failed = |e: kiln_fs::resolve::RootError| BuildError::image("wiping /", e);
    for name in root.read_dir(rel).map_err(failed)? {
        let child_rel = rel.join(name);
        if ignore.is_ignored(&child_rel) {
            continue;
        }
        let is_dir = match root.symlink_metadata(&child_rel) {
            Ok(meta) => meta.is_dir(),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(failed(e)),
        };
        let holds_kept = kept.iter().any(|k| k.starts_with(&child_rel));
        if is_dir && holds_kept {
            wipe_dir(root, &child_rel, ignore, kept)?;
            // Empty now, unless the ignored paths it leads to exist: then it stays.
            match root.remove(&child_rel) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) || e.is_not_found() => {}
                other => other.map_err(failed)?,
            }
        } else {
            root.remove_all(&child_rel).map_err(failed)?;
        }
    }
    Ok(())
}

/// Unpacks `layers` (all in the blob store) into `/`, leaving the ignored paths alone.
pub fn unpack_into_root(
    layers: &[ImageLayer],
    blobs: &kiln_fs::blobstore::BlobStore,
    ignore: &IgnoreSet,
) -> Result<(), BuildError> {
    let skip = |rel: &Path| ignore.is_ignored(rel);
    base::unpack_into_except(
        Path::new("/"),
        layers,
        blobs,
        &mut Index::new(),
        Some(&skip),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_keeps_ignored_paths_and_their_parents_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in [
            "kiln/work",
            "etc/ssl",
            "workspace/context",
            "usr/bin",
            "proc/1",
            "var/lib/x",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "kiln/executor",
            "etc/hosts",
            "etc/passwd",
            "usr/bin/sh",
            "top",
        ] {
            std::fs::write(root.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("/etc", root.join("usr/etc-link")).unwrap();
        std::os::unix::fs::symlink("kiln", root.join("kaniko")).unwrap();
        let options = IgnoreOptions {
            system_paths: true,
            var_run: true,
            mount_points: false,
            extra: vec![
                "/etc/hosts".into(),
                "/workspace/context".into(),
                "/var/lib/volume".into(),
            ],
        };
        let ignore = IgnoreSet::resolve(root, &options).unwrap();
        wipe(root, &ignore).unwrap();
        let mut left: Vec<String> = walkdir(root);
        left.sort();
        assert_eq!(
            left,
            [
                "etc",
                "etc/hosts",
                "kaniko",
                "kiln",
                "kiln/executor",
                "kiln/work",
                "proc",
                "proc/1",
                "workspace",
                "workspace/context",
            ]
        );
    }

    fn walkdir(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
                let entry = entry.unwrap();
                let child = rel.join(entry.file_name());
                out.push(child.to_string_lossy().into_owned());
                if entry.file_type().unwrap().is_dir() {
                    stack.push(child);
                }
            }
        }
        out
    }
}

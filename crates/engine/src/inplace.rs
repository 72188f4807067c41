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

/// The kernel's file systems: what a step finds there is the container's, never the image's.
const KERNEL_PATHS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Files the container runtime provides in every container, over whatever the image has.
const RUNTIME_FILES: [&str; 3] = ["/etc/resolv.conf", "/etc/hosts", "/etc/hostname"];

/// The debug image's busybox, whose shell CI systems (Jenkins, GitLab) run the build from. It
/// is the container's only when it was there before the first build of this process wiped
/// `/`: an image with a `/busybox` of its own, built in a container without one, keeps it.
const DEBUG_SHELL: &str = "/busybox";

/// Whether [`DEBUG_SHELL`] was in `/` when this process first asked, which is before its first
/// in-place build touched `/` (later stages and builds find what an image put there).
fn debug_shell_is_the_containers() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| std::fs::symlink_metadata(DEBUG_SHELL).is_ok())
}

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

/// `path` made absolute against the working directory.
fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    }
}

/// The spellings of the Kiln dir in `/`: as given, as resolved, and every symlink directly in
/// `/` that leads to it (Kiln's image has `/kaniko -> kiln`, which kaniko users' scripts and
/// mounts name). Nothing else called `/kiln` or `/kaniko` is special.
fn kiln_dir_spellings(kiln_dir: &Path) -> Vec<PathBuf> {
    let given = absolute(kiln_dir);
    let mut spellings = vec![given.clone()];
    let Ok(real) = std::fs::canonicalize(&given) else {
        return spellings;
    };
    if real != given {
        spellings.push(real.clone());
    }
    for entry in std::fs::read_dir("/").into_iter().flatten().flatten() {
        let path = entry.path();
        let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
        if is_link
            && !spellings.contains(&path)
            && std::fs::canonicalize(&path).ok() == Some(real.clone())
        {
            spellings.push(path);
        }
    }
    spellings
}

/// The paths an in-place build never deletes, overwrites or snapshots, for `options` and the
/// build context directory `context_root`: the kernel's file systems, the runtime's files, the
/// debug shell when the container has one, the Kiln dir (however it is spelled), the
/// `--ignore-path`s, `/var/run` with `--ignore-var-run`, every mount point, the context and the
/// files the build writes besides the image.
pub fn ignore_options(options: &BuildOptions, context_root: &Path) -> IgnoreOptions {
    let mut extra: Vec<PathBuf> = options.snapshot.ignore_paths.clone();
    extra.extend(KERNEL_PATHS.iter().chain(&RUNTIME_FILES).map(PathBuf::from));
    if debug_shell_is_the_containers() {
        extra.push(PathBuf::from(DEBUG_SHELL));
    }
    extra.extend(kiln_dir_spellings(&options.kiln_dir));
    let mut keep = |path: &Path| {
        let absolute = absolute(path);
        // Both spellings: the snapshotter compares paths as written, not resolved.
        if let Ok(real) = std::fs::canonicalize(&absolute) {
            extra.push(real);
        }
        extra.push(absolute);
    };
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
        // Listed above: `/kiln` and `/kaniko` are the Kiln dir only when they are.
        system_paths: false,
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
    wipe_dir(&tree, Path::new(""), ignore, &kept)?;
    // The process's working directory may have been one of the deleted directories (kaniko's
    // image starts in /workspace). A deleted working directory breaks every later lookup that
    // asks for it, gix's clone of an ADD'ed repository among them, while nothing relative to
    // it can be reached any more anyway; so the process moves to the root it just wiped.
    if std::env::current_dir().is_err() {
        std::env::set_current_dir(root).map_err(|source| BuildError::Io {
            path: root.to_path_buf(),
            source,
        })?;
    }
    Ok(())
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

/// Unpacks `layers` (all in the blob store) into `/`, leaving the ignored paths alone; what
/// the layers hold inside an ignored path is told to `warn`, once per ignored path.
pub fn unpack_into_root(
    layers: &[ImageLayer],
    blobs: &kiln_fs::blobstore::BlobStore,
    ignore: &IgnoreSet,
    options: &BuildOptions,
    warn: &dyn Fn(String),
) -> Result<(), BuildError> {
    let left_out = std::cell::RefCell::new(LeftOut::default());
    let skip = |rel: &Path| {
        let ignored = ignore.is_ignored(rel);
        if ignored {
            left_out.borrow_mut().note(ignore, rel, false);
        }
        ignored
    };
    base::unpack_into_except(
        Path::new("/"),
        layers,
        blobs,
        &mut Index::new(),
        Some(&skip),
    )?;
    for found in left_out.into_inner().warnings(options) {
        warn(format!(
            "in-place mode: the layers unpacked hold {found}, which the build leaves alone: \
             the image keeps these files, but RUN steps do not see them"
        ));
    }
    Ok(())
}

/// Entries an in-place build did not write because they are inside an ignored path, by the
/// ignored path they are in, for warnings that name them.
#[derive(Debug, Default)]
pub(crate) struct LeftOut {
    by_root: std::collections::BTreeMap<PathBuf, Vec<PathBuf>>,
}

impl LeftOut {
    /// Records `rel` (relative to `/`), which `ignore` leaves out. The ignored path itself is
    /// recorded only when `itself` (a copy to it; a layer's `/proc` or `/kiln` directory entry
    /// loses nothing), otherwise only what is inside it.
    pub(crate) fn note(&mut self, ignore: &IgnoreSet, rel: &Path, itself: bool) {
        let mut prefix = PathBuf::new();
        for component in rel.components() {
            prefix.push(component);
            if ignore.is_ignored(&prefix) {
                if itself || prefix.as_path() != rel {
                    let paths = self.by_root.entry(prefix).or_default();
                    paths.push(rel.to_path_buf());
                }
                return;
            }
        }
    }

    /// One text per ignored path that held something worth a warning: the first paths left
    /// out and how many there were, with why that path is ignored. The kernel's file systems
    /// and the runtime's files are left out of every in-place build and need no warning.
    pub(crate) fn warnings(&self, options: &BuildOptions) -> Vec<String> {
        const SHOWN: usize = 3;
        let mut out = Vec::new();
        for (root, paths) in &self.by_root {
            let absolute = Path::new("/").join(root);
            let Some(why) = ignore_reason(options, &absolute) else {
                continue;
            };
            // A directory is named only when nothing below it is: its files say more.
            let mut sorted: Vec<&PathBuf> = paths.iter().collect();
            sorted.sort();
            sorted.dedup();
            let leaves: Vec<&PathBuf> = sorted
                .iter()
                .enumerate()
                .filter(|(i, p)| !sorted.get(i + 1).is_some_and(|next| next.starts_with(p)))
                .map(|(_, p)| *p)
                .collect();
            let mut named: Vec<String> = leaves
                .iter()
                .take(SHOWN)
                .map(|p| format!("/{}", p.display()))
                .collect();
            if leaves.len() > SHOWN {
                named.push(format!("{} more", leaves.len() - SHOWN));
            }
            out.push(format!(
                "{} inside {} ({why})",
                named.join(", "),
                absolute.display()
            ));
        }
        out
    }
}

/// Why in-place mode leaves `path` (an ignored path, absolute) alone; `None` for the paths
/// every container has and no image should write (the kernel's file systems, the runtime's
/// files).
fn ignore_reason(options: &BuildOptions, path: &Path) -> Option<&'static str> {
    let is = |list: &[&str]| list.iter().any(|p| Path::new(p) == path);
    if is(&KERNEL_PATHS) || is(&RUNTIME_FILES) {
        return None;
    }
    Some(
        if kiln_dir_spellings(&options.kiln_dir)
            .iter()
            .any(|p| p == path)
        {
            "Kiln's own directory, --kaniko-dir"
        } else if path == Path::new(DEBUG_SHELL) {
            "the debug image's shell"
        } else if options
            .snapshot
            .ignore_paths
            .iter()
            .any(|p| Path::new("/").join(p) == path)
        {
            "an --ignore-path"
        } else if path == Path::new("/var/run") {
            "--ignore-var-run"
        } else {
            "a mount point of this container, the build context or an output file"
        },
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

//! Paths inside a rootfs: contained symlink resolution, and mount targets that are created for
//! one step and removed after it so that they never reach a layer.
//!
//! The rootfs is image content, hence untrusted: `/etc/hosts` may be a symlink to `/etc/shadow`
//! of the host, `/dev` a symlink to `/`. Every path is therefore resolved as if the rootfs were
//! `/` (absolute symlink targets restart at the rootfs, `..` stops at it), component by
//! component with `lstat`, before anything is mounted on it. Resolution happens before the
//! step's processes exist, so nothing inside the rootfs can change a path between its check and
//! its use.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use crate::error::SandboxError;

/// Same limit as the kernel's path walk.
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` (as seen inside the rootfs; relative paths are taken from its `/`) to a host
/// path under `root`, following symlinks inside `root`. Components after the first missing one
/// are appended as they are.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, SandboxError> {
    let mut pending: VecDeque<OsString> = components(path).collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = join(root, &resolved);
        candidate.push(&name);
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(SandboxError::BadPath {
                        path: candidate,
                        reason: "too many levels of symbolic links".into(),
                    });
                }
                let target =
                    fs::read_link(&candidate).map_err(|e| SandboxError::io(&candidate, e))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for comp in components(&target).collect::<Vec<_>>().into_iter().rev() {
                    pending.push_front(comp);
                }
            }
            Ok(_) => resolved.push(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => resolved.push(name),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(SandboxError::BadPath {
                    path: candidate,
                    reason: "a parent is not a directory".into(),
                })
            }
            Err(e) => return Err(SandboxError::io(candidate, e)),
        }
    }
    Ok(join(root, &resolved))
}

/// The normal components of `path`, with `..` kept as a component and `.`/`/` dropped.
fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(s) => Some(s.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

fn join(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// Creates the directories of `inside` that are missing under `root`, owned by `uid:gid` with
/// mode 0755 (how BuildKit creates a WORKDIR for the current USER). Existing directories are
/// left as they are. Returns the host path.
pub fn create_dirs_owned(
    root: &Path,
    inside: &Path,
    uid: u32,
    gid: u32,
) -> Result<PathBuf, SandboxError> {
    let resolved = resolve_in_root(root, inside)?;
    let rel = resolved.strip_prefix(root).unwrap_or(Path::new(""));
    let mut cur = root.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(SandboxError::BadPath {
                    path: cur,
                    reason: "exists and is not a directory".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&cur)
                    .map_err(|e| SandboxError::io(&cur, e))?;
                std::os::unix::fs::lchown(&cur, Some(uid), Some(gid))
                    .map_err(|e| SandboxError::io(&cur, e))?;
            }
            Err(e) => return Err(SandboxError::io(&cur, e)),
        }
    }
    Ok(resolved)
}

struct Created {
    path: PathBuf,
    is_dir: bool,
    ino: u64,
}

struct ParentTimes {
    path: PathBuf,
    accessed: SystemTime,
    modified: SystemTime,
    /// mtime right after our last change, to tell later whether the step changed it too.
    modified_after_us: SystemTime,
}

/// Mount targets created for one step (only where the rootfs lacks them), removed again by
/// [`Stubs::remove`]; the directories they were created in get their mtime back when the step
/// did not change them itself.
pub(crate) struct Stubs {
    root: PathBuf,
    created: Vec<Created>,
    parents: Vec<ParentTimes>,
}

impl Stubs {
    pub(crate) fn new(root: &Path) -> Self {
        Stubs {
            root: root.to_path_buf(),
            created: Vec::new(),
            parents: Vec::new(),
        }
    }

    /// Makes sure `inside` is a directory; returns its resolved host path.
    pub(crate) fn dir(&mut self, inside: &Path) -> Result<PathBuf, SandboxError> {
        let resolved = resolve_in_root(&self.root, inside)?;
        self.create_dirs(&resolved)?;
        Ok(resolved)
    }

    /// Makes sure `inside` is a non-directory (an empty file is created if it is missing);
    /// returns its resolved host path.
    pub(crate) fn file(&mut self, inside: &Path) -> Result<PathBuf, SandboxError> {
        let resolved = resolve_in_root(&self.root, inside)?;
        if let Some(parent) = resolved.parent().filter(|p| p.starts_with(&self.root)) {
            self.create_dirs(parent)?;
        }
        match fs::symlink_metadata(&resolved) {
            Ok(m) if m.is_dir() => Err(SandboxError::BadPath {
                path: resolved,
                reason: "is a directory, but a file is mounted there".into(),
            }),
            Ok(_) => Ok(resolved),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let parent = resolved.parent().unwrap_or(&self.root).to_path_buf();
                self.before_change(&parent)?;
                let file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&resolved)
                    .map_err(|e| SandboxError::io(&resolved, e))?;
                let ino = file
                    .metadata()
                    .map_err(|e| SandboxError::io(&resolved, e))?
                    .ino();
                self.created.push(Created {
                    path: resolved.clone(),
                    is_dir: false,
                    ino,
                });
                self.after_change(&parent);
                Ok(resolved)
            }
            Err(e) => Err(SandboxError::io(resolved, e)),
        }
    }

    fn create_dirs(&mut self, resolved: &Path) -> Result<(), SandboxError> {
        let rel = resolved
            .strip_prefix(&self.root)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let mut cur = self.root.clone();
        for comp in rel.components() {
            let parent = cur.clone();
            cur.push(comp);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(SandboxError::BadPath {
                        path: cur,
                        reason: "exists and is not a directory, but a directory is needed".into(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.before_change(&parent)?;
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&cur)
                        .map_err(|e| SandboxError::io(&cur, e))?;
                    let ino = fs::symlink_metadata(&cur)
                        .map_err(|e| SandboxError::io(&cur, e))?
                        .ino();
                    self.created.push(Created {
                        path: cur.clone(),
                        is_dir: true,
                        ino,
                    });
                    self.after_change(&parent);
                }
                Err(e) => return Err(SandboxError::io(&cur, e)),
            }
        }
        Ok(())
    }

    fn before_change(&mut self, dir: &Path) -> Result<(), SandboxError> {
        if self.parents.iter().any(|p| p.path == dir) {
            return Ok(());
        }
        let meta = fs::metadata(dir).map_err(|e| SandboxError::io(dir, e))?;
        let (accessed, modified) = times(&meta);
        self.parents.push(ParentTimes {
            path: dir.to_path_buf(),
            accessed,
            modified,
            modified_after_us: modified,
        });
        Ok(())
    }

    fn after_change(&mut self, dir: &Path) {
        if let (Some(p), Ok(meta)) = (
            self.parents.iter_mut().find(|p| p.path == dir),
            fs::metadata(dir),
        ) {
            p.modified_after_us = times(&meta).1;
        }
    }

    /// Removes what was created (a file only if it is still the empty file we made, a directory
    /// only if it is empty), then restores the atime/mtime of the directories we changed unless
    /// the step changed them as well. Returns those restored directories as paths inside the
    /// rootfs: their ctime is newer although nothing in them changed.
    pub(crate) fn remove(self) -> Vec<PathBuf> {
        let untouched: Vec<bool> = self
            .parents
            .iter()
            .map(|p| {
                fs::metadata(&p.path)
                    .map(|m| times(&m).1 == p.modified_after_us)
                    .unwrap_or(false)
            })
            .collect();
        let mut kept: Vec<&Path> = Vec::new();
        for c in self.created.iter().rev() {
            let removed = match fs::symlink_metadata(&c.path) {
                // Fails when the step put something in it; then it stays, as the step's.
                Ok(m) if c.is_dir && m.is_dir() && m.ino() == c.ino => {
                    fs::remove_dir(&c.path).is_ok()
                }
                Ok(m) if !c.is_dir && m.is_file() && m.ino() == c.ino && m.len() == 0 => {
                    fs::remove_file(&c.path).is_ok()
                }
                _ => false,
            };
            if !removed {
                kept.push(&c.path);
            }
        }
        let mut restored = Vec::new();
        for (p, untouched) in self.parents.iter().zip(untouched) {
            // A directory that keeps one of our entries did change; its new mtime is right.
            if !untouched || kept.iter().any(|k| k.parent() == Some(p.path.as_path())) {
                continue;
            }
            let times = fs::FileTimes::new()
                .set_accessed(p.accessed)
                .set_modified(p.modified);
            if fs::File::open(&p.path)
                .and_then(|f| f.set_times(times))
                .is_ok()
            {
                let inside = p.path.strip_prefix(&self.root).unwrap_or(Path::new(""));
                restored.push(Path::new("/").join(inside));
            }
        }
        restored
    }
}

fn times(meta: &fs::Metadata) -> (SystemTime, SystemTime) {
    (
        meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("real/etc")).unwrap();
        symlink("/real/etc", root.join("etc")).unwrap();
        symlink("../../../../..", root.join("real/up")).unwrap();
        symlink("/", root.join("dev")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("/etc/hosts")).unwrap(),
            root.join("real/etc/hosts")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/real/up/etc/x")).unwrap(),
            root.join("real/etc/x")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/dev/null")).unwrap(),
            root.join("null")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("../../a")).unwrap(),
            root.join("a")
        );
        symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in_root(root, Path::new("/loop")).is_err());
    }

    #[test]
    fn stubs_are_removed_and_parent_times_restored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("etc")).unwrap();
        fs::write(root.join("etc/hosts"), "keep").unwrap();
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        for d in [root.join("etc"), root.to_path_buf()] {
            fs::File::open(&d)
                .unwrap()
                .set_times(fs::FileTimes::new().set_modified(old))
                .unwrap();
        }
        let mut stubs = Stubs::new(root);
        assert_eq!(
            stubs.file(Path::new("/etc/hosts")).unwrap(),
            root.join("etc/hosts")
        );
        stubs.file(Path::new("/etc/resolv.conf")).unwrap();
        stubs.dir(Path::new("/proc")).unwrap();
        stubs.file(Path::new("/run/secrets/token")).unwrap();
        assert!(root.join("run/secrets/token").is_file());
        let restored = stubs.remove();
        assert!(!root.join("etc/resolv.conf").exists());
        assert!(!root.join("proc").exists());
        assert!(!root.join("run").exists());
        assert_eq!(fs::read(root.join("etc/hosts")).unwrap(), b"keep");
        assert_eq!(
            fs::metadata(root.join("etc")).unwrap().modified().unwrap(),
            old
        );
        assert_eq!(fs::metadata(root).unwrap().modified().unwrap(), old);
        assert!(restored.contains(&PathBuf::from("/etc")));
        assert!(restored.contains(&PathBuf::from("/")));
    }

    #[test]
    fn a_directory_the_step_filled_is_kept_with_its_new_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut stubs = Stubs::new(root);
        stubs.file(Path::new("/etc/hostname")).unwrap();
        fs::write(root.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        let restored = stubs.remove();
        assert!(root.join("etc/passwd").exists());
        assert!(!root.join("etc/hostname").exists());
        assert!(!restored.contains(&PathBuf::from("/etc")));
        assert!(!restored.contains(&PathBuf::from("/")));
    }
}

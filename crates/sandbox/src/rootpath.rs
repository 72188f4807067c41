//! Paths inside a rootfs: directories a step needs, and mount targets that are created for
//! one step and removed after it so that they never reach a layer.
//!
//! The rootfs is image content, hence untrusted: `/etc/hosts` may be a symlink to `/etc/shadow`
//! of the host, `/dev` a symlink to `/`. Every path is therefore resolved and created through
//! kiln-fs's [`Root`] (absolute symlink targets restart at the rootfs, `..` stops at it) before
//! anything is mounted on it. Resolution happens before the step's processes exist, so nothing
//! inside the rootfs can change a path between its check and its use.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_fs::resolve::Root;
use rustix::fs::Timespec;

use crate::error::SandboxError;

/// Creates the directories of `inside` that are missing under `rootfs`, owned by `uid:gid`
/// with mode 0755 (how BuildKit creates a WORKDIR for the current USER). Existing directories
/// are left as they are; symlinks on the way are followed inside the rootfs. Returns the host
/// path.
pub fn create_dirs_owned(
    rootfs: &Path,
    inside: &Path,
    uid: u32,
    gid: u32,
) -> Result<PathBuf, SandboxError> {
    let root = Root::open(rootfs)?;
    let resolved = root.resolve(inside, true)?;
    let mut cur = PathBuf::new();
    for comp in resolved.components() {
        cur.push(comp);
        match root.symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(SandboxError::BadPath {
                    path: rootfs.join(&cur),
                    reason: "exists and is not a directory".into(),
                })
            }
            Err(e) if e.is_not_found() => {
                root.mkdir_all(&cur, 0o755)?;
                root.set_owner(&cur, uid, gid)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(rootfs.join(resolved))
}

struct Created {
    path: PathBuf,
    is_dir: bool,
    ino: u64,
}

struct ParentTimes {
    path: PathBuf,
    accessed: Timespec,
    modified: Timespec,
    /// mtime right after our last change, to tell later whether the step changed it too.
    modified_after_us: Timespec,
}

/// Mount targets created for one step (only where the rootfs lacks them), removed again by
/// [`Stubs::remove`]; the directories they were created in get their mtime back when the step
/// did not change them itself. Paths are relative to the rootfs, as resolved in it.
pub(crate) struct Stubs {
    root: Root,
    created: Vec<Created>,
    parents: Vec<ParentTimes>,
}

impl Stubs {
    pub(crate) fn new(rootfs: &Path) -> Result<Self, SandboxError> {
        Ok(Stubs {
            root: Root::open(rootfs)?,
            created: Vec::new(),
            parents: Vec::new(),
        })
    }

    /// Makes sure `inside` is a directory; returns its resolved host path.
    pub(crate) fn dir(&mut self, inside: &Path) -> Result<PathBuf, SandboxError> {
        let resolved = self.root.resolve(inside, true)?;
        self.create_dirs(&resolved)?;
        Ok(self.root.path().join(resolved))
    }

    /// Makes sure `inside` is a non-directory (an empty file is created if it is missing);
    /// returns its resolved host path.
    pub(crate) fn file(&mut self, inside: &Path) -> Result<PathBuf, SandboxError> {
        let resolved = self.root.resolve(inside, true)?;
        let parent = resolved.parent().unwrap_or(Path::new("")).to_path_buf();
        self.create_dirs(&parent)?;
        let host = self.root.path().join(&resolved);
        match self.root.symlink_metadata(&resolved) {
            Ok(m) if m.is_dir() => Err(SandboxError::BadPath {
                path: host,
                reason: "is a directory, but a file is mounted there".into(),
            }),
            Ok(_) => Ok(host),
            Err(e) if e.is_not_found() => {
                self.before_change(&parent)?;
                let file = self.root.create_new(&resolved, 0o644)?;
                let ino = file
                    .metadata()
                    .map_err(|e| SandboxError::io(&host, e))?
                    .ino();
                self.created.push(Created {
                    path: resolved,
                    is_dir: false,
                    ino,
                });
                self.after_change(&parent);
                Ok(host)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn create_dirs(&mut self, resolved: &Path) -> Result<(), SandboxError> {
        let mut cur = PathBuf::new();
        for comp in resolved.components() {
            let parent = cur.clone();
            cur.push(comp);
            match self.root.symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(SandboxError::BadPath {
                        path: self.root.path().join(&cur),
                        reason: "exists and is not a directory, but a directory is needed".into(),
                    })
                }
                Err(e) if e.is_not_found() => {
                    self.before_change(&parent)?;
                    self.root.mkdir_all(&cur, 0o755)?;
                    let ino = self.root.symlink_metadata(&cur)?.ino();
                    self.created.push(Created {
                        path: cur.clone(),
                        is_dir: true,
                        ino,
                    });
                    self.after_change(&parent);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn before_change(&mut self, dir: &Path) -> Result<(), SandboxError> {
        if self.parents.iter().any(|p| p.path == dir) {
            return Ok(());
        }
        let (accessed, modified) = times(&self.root.metadata(dir)?);
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
            self.root.metadata(dir),
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
                self.root
                    .metadata(&p.path)
                    .map(|m| times(&m).1 == p.modified_after_us)
                    .unwrap_or(false)
            })
            .collect();
        let mut kept: Vec<&Path> = Vec::new();
        for c in self.created.iter().rev() {
            let ours = match self.root.symlink_metadata(&c.path) {
                Ok(m) if c.is_dir => m.is_dir() && m.ino() == c.ino,
                Ok(m) => m.is_file() && m.ino() == c.ino && m.len() == 0,
                Err(_) => false,
            };
            // Removing fails when the step put something in the directory; then it stays, as
            // the step's.
            if !(ours && self.root.remove(&c.path).is_ok()) {
                kept.push(&c.path);
            }
        }
        let mut restored = Vec::new();
        for (p, untouched) in self.parents.iter().zip(untouched) {
            // A directory that keeps one of our entries did change; its new mtime is right.
            if !untouched || kept.iter().any(|k| k.parent() == Some(p.path.as_path())) {
                continue;
            }
            if self.root.set_times(&p.path, p.accessed, p.modified).is_ok() {
                restored.push(Path::new("/").join(&p.path));
            }
        }
        restored
    }
}

fn times(meta: &Metadata) -> (Timespec, Timespec) {
    (
        Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        },
        Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::time::SystemTime;

    #[test]
    fn stub_targets_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("real/etc")).unwrap();
        symlink("/real/etc", root.join("etc")).unwrap();
        symlink("../../../../..", root.join("real/up")).unwrap();
        symlink("/", root.join("dev")).unwrap();
        let mut stubs = Stubs::new(root).unwrap();
        assert_eq!(
            stubs.file(Path::new("/etc/hosts")).unwrap(),
            root.join("real/etc/hosts")
        );
        assert_eq!(
            stubs.dir(Path::new("/real/up/etc/x")).unwrap(),
            root.join("real/etc/x")
        );
        assert_eq!(
            stubs.file(Path::new("/dev/null")).unwrap(),
            root.join("null")
        );
        assert_eq!(stubs.dir(Path::new("../../a")).unwrap(), root.join("a"));
        symlink("loop", root.join("loop")).unwrap();
        assert!(stubs.dir(Path::new("/loop")).is_err());
        stubs.remove();
        assert!(!root.join("null").exists() && !root.join("a").exists());
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
        let mut stubs = Stubs::new(root).unwrap();
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
        let mut stubs = Stubs::new(root).unwrap();
        stubs.file(Path::new("/etc/hostname")).unwrap();
        fs::write(root.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        let restored = stubs.remove();
        assert!(root.join("etc/passwd").exists());
        assert!(!root.join("etc/hostname").exists());
        assert!(!restored.contains(&PathBuf::from("/etc")));
        assert!(!restored.contains(&PathBuf::from("/")));
    }
}

//! `RUN --mount` without mount(2): in-place mode in a container without CAP_SYS_ADMIN (a
//! default Pod), where a step cannot get a mount namespace of its own. Each mount the step
//! asks for is made visible at its target in `/` for the step only, and undone before the
//! step's snapshot:
//!
//! - a file or socket Kiln made for the step (a secret, an ssh-agent socket, the private copy
//!   behind a read-write bind mount) is moved from the step's scratch directory to the target,
//!   and moved back after;
//! - a cache directory is moved from the Kiln dir to the target and moved back, with what the
//!   step left in it;
//! - a read-only bind source (from the context, a stage or an image) is copied to the target
//!   and the copy removed after: the step could change the copy, never the source;
//! - a tmpfs is an empty directory, removed after;
//! - whatever the image had at a target is moved aside into the scratch directory for the step
//!   and put back; parent directories made for a target are removed again, and the times of
//!   the directories touched are put back unless the step changed them too, as the sandbox does
//!   for its mount targets.
//!
//! Undoing happens whether the step succeeded, failed or was killed, and a failure to undo
//! fails the step, so none of these files reaches a layer. What cannot be emulated is the
//! read-only view and the isolation: the step sees the files as ordinary ones, and could copy a
//! secret elsewhere (as it could from a mount).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_fs::resolve::{Root, RootError};
use kiln_sandbox::{MountKind, MountSpec};
use rustix::fs::Timespec;

/// What was done for one mount, to undo after the step.
struct Placement {
    /// The target as resolved in `/` (relative to it).
    target: PathBuf,
    /// How the target's content goes away.
    undo: Undo,
    /// Where the image's own entry at the target waits meanwhile, if there was one.
    stashed: Option<Aside>,
}

/// Where an entry of the image waits while a mount's content is at its place.
enum Aside {
    /// In the scratch directory, under this name.
    Scratch(PathBuf),
    /// Next to its place in `/` (the scratch directory is on another file system), at this
    /// path relative to `/`.
    Beside(PathBuf),
}

enum Undo {
    /// Moved from this host path: moved back there.
    MoveBack(PathBuf),
    /// Copied from this host path (a cache on another file system): copied back, then
    /// removed.
    CopyBack(PathBuf),
    /// A copy, an empty directory or a link of the step's own: removed.
    Remove,
}

/// A directory whose times are put back after the step.
struct Touched {
    path: PathBuf,
    accessed: Timespec,
    modified: Timespec,
    /// Its mtime after the last change made here, to tell whether the step changed it too.
    modified_after_us: Timespec,
}

/// The mounts of one step, made as files in `/`; [`Placed::undo`] takes them away.
pub(crate) struct Placed {
    root: Root,
    scratch: Root,
    placements: Vec<Placement>,
    created_dirs: Vec<(PathBuf, u64)>,
    touched: Vec<Touched>,
    done: bool,
}

/// Whether a bind source is Kiln's own for this step, to be moved rather than copied.
pub(crate) type Movable<'a> = &'a dyn Fn(&Path) -> bool;

impl Placed {
    /// Makes each of `mounts` visible at its target under `rootfs` (the in-place `/`),
    /// moving aside into `scratch` what the image has there. Sources for which `movable` is
    /// true are moved, others copied. On an error, what was already placed is undone.
    pub(crate) fn place(
        rootfs: &Path,
        scratch: &Path,
        mounts: &[MountSpec],
        movable: Movable<'_>,
    ) -> Result<Placed, String> {
        let failed = |e: RootError| e.to_string();
        let mut placed = Placed {
            root: Root::open(rootfs).map_err(failed)?,
            scratch: Root::open(scratch).map_err(failed)?,
            placements: Vec::new(),
            created_dirs: Vec::new(),
            touched: Vec::new(),
            done: false,
        };
        for (number, mount) in mounts.iter().enumerate() {
            if let Err(e) = placed.place_one(number, mount, movable) {
                let _ = placed.undo();
                return Err(format!("{}: {e}", mount.target.display()));
            }
        }
        Ok(placed)
    }

    fn place_one(
        &mut self,
        number: usize,
        mount: &MountSpec,
        movable: Movable<'_>,
    ) -> Result<(), String> {
        let failed = |e: RootError| e.to_string();
        let target = self.root.resolve(&mount.target, true).map_err(failed)?;
        let parent = target.parent().unwrap_or(Path::new("")).to_path_buf();
        if target.as_os_str().is_empty() {
            return Err("a mount on / cannot be made without CAP_SYS_ADMIN".into());
        }
        self.create_dirs(&parent)?;
        self.before_change(&parent)?;
        let stashed = match self.root.symlink_metadata(&target) {
            Ok(_) => Some(self.stash(number, &target)?),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.to_string()),
        };
        // Recorded before the content is made, so that a failure below still puts the
        // image's entry back.
        self.placements.push(Placement {
            target: target.clone(),
            undo: Undo::Remove,
            stashed,
        });
        let undo = match &mount.kind {
            MountKind::Tmpfs { .. } => {
                self.root.mkdir_all(&target, 0o755).map_err(failed)?;
                self.root.set_mode(&target, 0o1777).map_err(failed)?;
                Undo::Remove
            }
            MountKind::Bind { source, .. } if movable(source) => self.bring(source, &target)?,
            MountKind::Bind { source, .. } => {
                let host = self.root.path().join(&target);
                kiln_fs::clone::clone_tree(source, &host).map_err(|e| e.to_string())?;
                Undo::Remove
            }
        };
        if let Some(last) = self.placements.last_mut() {
            last.undo = undo;
        }
        self.after_change(&parent);
        Ok(())
    }

    /// Moves Kiln's own `source` to `target`. Across file systems a socket is linked
    /// instead (connecting follows the link), and anything else is copied: a cache is then
    /// copied back after the step, a file of the scratch directory just removed with it.
    fn bring(&self, source: &Path, target: &Path) -> Result<Undo, String> {
        let (dir, name) = split(source)?;
        let from = Root::open(dir).map_err(|e| e.to_string())?;
        match rename(&from, &name, &self.root, target) {
            Ok(()) => return Ok(Undo::MoveBack(source.to_path_buf())),
            Err(e) if e != rustix::io::Errno::XDEV => {
                return Err(format!("cannot move {} into place: {e}", source.display()))
            }
            Err(_) => {}
        }
        let meta = std::fs::symlink_metadata(source).map_err(|e| e.to_string())?;
        if meta.file_type().is_socket() {
            self.root
                .symlink(source, target)
                .map_err(|e| e.to_string())?;
            return Ok(Undo::Remove);
        }
        let host = self.root.path().join(target);
        kiln_fs::clone::clone_tree(source, &host).map_err(|e| e.to_string())?;
        if meta.is_dir() {
            Ok(Undo::CopyBack(source.to_path_buf()))
        } else {
            Ok(Undo::Remove)
        }
    }

    /// Moves the image's entry at `target` aside for the step: into the scratch directory, or
    /// when that is on another file system, next to itself under a name no image uses.
    fn stash(&self, number: usize, target: &Path) -> Result<Aside, String> {
        let (dir, name) = split(target)?;
        let from = self.root.subroot(&dir).map_err(|e| e.to_string())?;
        let scratch_name = PathBuf::from(format!("stash-{number}"));
        let moved = match rename(&from, &name, &self.scratch, &scratch_name) {
            Ok(()) => return Ok(Aside::Scratch(scratch_name)),
            Err(rustix::io::Errno::XDEV) => {
                let sibling = dir.join(format!(".kiln-aside-{number}-{}", name.display()));
                rename(&from, &name, &self.root, &sibling).map(|()| Aside::Beside(sibling))
            }
            Err(e) => Err(e),
        };
        moved.map_err(|e| format!("cannot move the image's entry aside: {e}"))
    }

    /// Puts the image's entry back at `target` from where [`Placed::stash`] moved it.
    fn unstash(&self, aside: &Aside, target: &Path) -> Result<(), String> {
        let (dir, name) = split(target)?;
        let to = self.root.subroot(&dir).map_err(|e| e.to_string())?;
        let moved = match aside {
            Aside::Scratch(name_there) => rename(&self.scratch, name_there, &to, &name),
            Aside::Beside(sibling) => rename(&self.root, sibling, &to, &name),
        };
        moved.map_err(|e| format!("cannot put the image's entry back: {e}"))
    }

    /// Takes every placement away, last first, puts the image's entries back, removes the
    /// directories made for targets and puts back the times of the directories touched.
    /// Returns those directories (relative to `/`): only their ctime differs from before.
    pub(crate) fn undo(&mut self) -> Result<Vec<PathBuf>, String> {
        if self.done {
            return Ok(Vec::new());
        }
        self.done = true;
        let untouched: Vec<bool> = self
            .touched
            .iter()
            .map(|t| {
                self.root
                    .metadata(&t.path)
                    .is_ok_and(|m| mtime(&m) == t.modified_after_us)
            })
            .collect();
        let mut first_error = None;
        let mut restored = Vec::new();
        for placement in std::mem::take(&mut self.placements).into_iter().rev() {
            if let Err(e) = self.take_away(&placement) {
                first_error.get_or_insert(format!("{}: {e}", placement.target.display()));
            }
            if placement.stashed.is_some() {
                restored.push(placement.target.clone());
            }
        }
        for (dir, ino) in std::mem::take(&mut self.created_dirs).into_iter().rev() {
            let ours = self
                .root
                .symlink_metadata(&dir)
                .is_ok_and(|m| m.is_dir() && m.ino() == ino);
            // A directory the step put something in stays, as the step's.
            if ours && self.root.remove(&dir).is_ok() {
                continue;
            }
        }
        for (touched, untouched) in self.touched.iter().zip(untouched) {
            if untouched
                && self
                    .root
                    .set_times(&touched.path, touched.accessed, touched.modified)
                    .is_ok()
            {
                restored.push(touched.path.clone());
            }
        }
        match first_error {
            Some(e) => Err(format!(
                "RUN --mount without CAP_SYS_ADMIN: cannot take away what the step's mounts put in /: {e}"
            )),
            None => Ok(restored),
        }
    }

    fn take_away(&self, placement: &Placement) -> Result<(), String> {
        let target = &placement.target;
        let present = self.root.symlink_metadata(target).is_ok();
        match &placement.undo {
            Undo::MoveBack(origin) if present => {
                let (dir, name) = split(origin)?;
                let to = Root::open(dir).map_err(|e| e.to_string())?;
                let (from_dir, from_name) = split(target)?;
                let from = self.root.subroot(from_dir).map_err(|e| e.to_string())?;
                if let Err(e) = rename(&from, &from_name, &to, Path::new(&name)) {
                    self.root.remove_all(target).map_err(|e| e.to_string())?;
                    return Err(format!("cannot move it back to {}: {e}", origin.display()));
                }
            }
            Undo::CopyBack(origin) if present => {
                let host = self.root.path().join(target);
                let _ = std::fs::remove_dir_all(origin);
                let copied = kiln_fs::clone::clone_tree(&host, origin).map_err(|e| e.to_string());
                self.root.remove_all(target).map_err(|e| e.to_string())?;
                copied?;
            }
            _ => {
                self.root.remove_all(target).map_err(|e| e.to_string())?;
            }
        }
        if let Some(aside) = &placement.stashed {
            self.unstash(aside, target)?;
        }
        Ok(())
    }

    /// Creates the missing directories of `dir` (0755, root), remembering them.
    fn create_dirs(&mut self, dir: &Path) -> Result<(), String> {
        let mut cur = PathBuf::new();
        for component in dir.components() {
            let parent = cur.clone();
            cur.push(component);
            match self.root.symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("/{} is not a directory", cur.display())),
                Err(e) if e.is_not_found() => {
                    self.before_change(&parent)?;
                    self.root
                        .mkdir_all(&cur, 0o755)
                        .map_err(|e| e.to_string())?;
                    let ino = self
                        .root
                        .symlink_metadata(&cur)
                        .map_err(|e| e.to_string())?
                        .ino();
                    self.created_dirs.push((cur.clone(), ino));
                    self.after_change(&parent);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    fn before_change(&mut self, dir: &Path) -> Result<(), String> {
        if self.touched.iter().any(|t| t.path == dir) {
            return Ok(());
        }
        let meta = self.root.metadata(dir).map_err(|e| e.to_string())?;
        self.touched.push(Touched {
            path: dir.to_path_buf(),
            accessed: Timespec {
                tv_sec: meta.atime(),
                tv_nsec: meta.atime_nsec(),
            },
            modified: mtime(&meta),
            modified_after_us: mtime(&meta),
        });
        Ok(())
    }

    fn after_change(&mut self, dir: &Path) {
        let now = self.root.metadata(dir).map(|m| mtime(&m));
        if let (Some(touched), Ok(now)) = (self.touched.iter_mut().find(|t| t.path == dir), now) {
            touched.modified_after_us = now;
        }
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        // An early return or a panic between placing and undoing still takes everything away.
        let _ = self.undo();
    }
}

fn mtime(meta: &std::fs::Metadata) -> Timespec {
    Timespec {
        tv_sec: meta.mtime(),
        tv_nsec: meta.mtime_nsec(),
    }
}

/// `path`'s directory and final name.
fn split(path: &Path) -> Result<(PathBuf, PathBuf), String> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir.to_path_buf(), PathBuf::from(name))),
        _ => Err(format!("{}: not a path to an entry", path.display())),
    }
}

/// Renames `name` in `from` to `to` inside `dest`, replacing nothing.
fn rename(from: &Root, name: &Path, dest: &Root, to: &Path) -> Result<(), rustix::io::Errno> {
    let source = from.resolve_parent(name).map_err(errno)?;
    let target = dest.resolve_parent(to).map_err(errno)?;
    rustix::fs::renameat_with(
        source.dir(),
        source.name(),
        target.dir(),
        target.name(),
        rustix::fs::RenameFlags::NOREPLACE,
    )
}

fn errno(e: RootError) -> rustix::io::Errno {
    rustix::io::Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mtime_of(path: &Path) -> (i64, i64) {
        let meta = std::fs::metadata(path).unwrap();
        (meta.mtime(), meta.mtime_nsec())
    }

    fn bind(source: &Path, target: &str) -> MountSpec {
        MountSpec {
            target: PathBuf::from(target),
            kind: MountKind::Bind {
                source: source.to_path_buf(),
                readonly: true,
            },
        }
    }

    /// A stage rootfs, a scratch directory and a cache store, and a context outside them.
    struct Trees {
        _dir: tempfile::TempDir,
        root: PathBuf,
        scratch: PathBuf,
        caches: PathBuf,
        context: PathBuf,
    }

    fn trees() -> Trees {
        let dir = tempfile::tempdir().unwrap();
        let [root, scratch, caches, context] =
            ["root", "scratch", "caches", "context"].map(|d| dir.path().join(d));
        for d in ["opt/tool", "var", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("opt/tool/own.txt"), "the image's").unwrap();
        std::fs::create_dir_all(caches.join("app")).unwrap();
        std::fs::write(caches.join("app/c.txt"), "cached").unwrap();
        std::fs::create_dir_all(context.join("data")).unwrap();
        std::fs::write(context.join("data/one.txt"), "from the context").unwrap();
        std::fs::create_dir_all(&scratch).unwrap();
        let secret = scratch.join("secret-token");
        std::fs::write(&secret, "hunter2").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
        Trees {
            _dir: dir,
            root,
            scratch,
            caches,
            context,
        }
    }

    #[test]
    fn mounts_are_placed_for_the_step_and_everything_is_put_back() {
        let t = trees();
        let before: Vec<_> = ["", "opt", "opt/tool", "var", "tmp"]
            .iter()
            .map(|d| mtime_of(&t.root.join(d)))
            .collect();
        let mounts = [
            bind(&t.scratch.join("secret-token"), "/run/secrets/token"),
            bind(&t.caches.join("app"), "/var/cache/app"),
            bind(&t.context.join("data"), "/opt/tool"),
            MountSpec {
                target: PathBuf::from("/tmp/scratch"),
                kind: MountKind::Tmpfs { size: None },
            },
        ];
        let movable = |p: &Path| p.starts_with(&t.scratch) || p.starts_with(&t.caches);
        let mut placed = Placed::place(&t.root, &t.scratch, &mounts, &movable).unwrap();

        let secret = t.root.join("run/secrets/token");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "hunter2");
        assert_eq!(std::fs::metadata(&secret).unwrap().mode() & 0o7777, 0o400);
        assert!(
            !t.scratch.join("secret-token").exists(),
            "moved, not copied"
        );
        assert!(t.root.join("var/cache/app/c.txt").is_file());
        assert!(t.root.join("opt/tool/one.txt").is_file());
        assert!(!t.root.join("opt/tool/own.txt").exists());
        let scratch_mode = std::fs::metadata(t.root.join("tmp/scratch"))
            .unwrap()
            .mode();
        assert_eq!(scratch_mode & 0o7777, 0o1777);
        // What the step does: writes into the cache, the bind copy and the tmpfs.
        std::fs::write(t.root.join("var/cache/app/new.txt"), "written").unwrap();
        std::fs::write(t.root.join("opt/tool/one.txt"), "changed").unwrap();
        std::fs::write(t.root.join("tmp/scratch/junk"), "junk").unwrap();

        let restored = placed.undo().unwrap();
        for gone in ["run", "var/cache", "tmp/scratch"] {
            assert!(!t.root.join(gone).exists(), "/{gone} is left");
        }
        assert_eq!(
            std::fs::read_to_string(t.root.join("opt/tool/own.txt")).unwrap(),
            "the image's"
        );
        assert!(!t.root.join("opt/tool/one.txt").exists());
        assert_eq!(
            std::fs::read_to_string(t.context.join("data/one.txt")).unwrap(),
            "from the context"
        );
        assert!(t.caches.join("app/c.txt").is_file() && t.caches.join("app/new.txt").is_file());
        assert!(
            t.scratch.join("secret-token").is_file(),
            "back where it was made"
        );
        let after: Vec<_> = ["", "opt", "opt/tool", "var", "tmp"]
            .iter()
            .map(|d| mtime_of(&t.root.join(d)))
            .collect();
        assert_eq!(before, after);
        for dir in ["", "opt", "var", "tmp", "opt/tool"] {
            assert!(
                restored.contains(&PathBuf::from(dir)),
                "{dir:?} in {restored:?}"
            );
        }
        assert!(placed.undo().unwrap().is_empty(), "undone once");
    }

    #[test]
    fn a_mount_that_cannot_be_placed_undoes_the_ones_before() {
        let t = trees();
        std::fs::write(t.root.join("opt/file"), "a file").unwrap();
        let mounts = [
            bind(&t.scratch.join("secret-token"), "/run/secrets/token"),
            bind(&t.context.join("data"), "/opt/file/below"),
        ];
        let movable = |p: &Path| p.starts_with(&t.scratch);
        let error = Placed::place(&t.root, &t.scratch, &mounts, &movable)
            .err()
            .unwrap();
        assert!(error.contains("/opt/file/below"), "{error}");
        assert!(!t.root.join("run").exists());
        assert!(t.scratch.join("secret-token").is_file());
    }

    #[test]
    fn dropping_undoes_what_was_placed() {
        let t = trees();
        let mounts = [bind(&t.caches.join("app"), "/var/cache/app")];
        let movable = |p: &Path| p.starts_with(&t.caches);
        let placed = Placed::place(&t.root, &t.scratch, &mounts, &movable).unwrap();
        assert!(t.root.join("var/cache/app/c.txt").is_file());
        drop(placed);
        assert!(!t.root.join("var/cache").exists());
        assert!(t.caches.join("app/c.txt").is_file());
    }
}

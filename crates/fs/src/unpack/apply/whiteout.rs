//! Whiteouts and opaque directories: removing what lower layers put where this layer says so,
//! while sparing this layer's own entries. Apart from the entry writers because it is the
//! one part of applying a layer that deletes.

use std::ffi::OsStr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use rustix::fd::BorrowedFd;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::{Applier, OpError};
use crate::resolve::{list_dir, remove_entry};
use crate::unpack::UnpackEvent;

/// The xattr that makes a directory of an overlay lower (or upper) dir opaque.
const OVERLAY_OPAQUE: &str = "trusted.overlay.opaque";

impl Applier<'_, '_> {
    pub(super) fn opaque(&mut self, dir: &Path) -> Result<(), OpError> {
        if self.pool_busy() {
            self.drain_pool()?;
        }
        let handle = match self.root.open_dir(dir) {
            Ok(handle) => handle,
            Err(e) if self.overlay && e.is_not_found() => return Err(super::not_alone(dir)),
            Err(e) if e.is_not_found() || e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if self.overlay {
            // The layer's own entries stay visible; overlayfs hides only the lower layers'.
            rustix::fs::fsetxattr(
                &handle,
                OVERLAY_OPAQUE,
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| self.io_err("mark opaque", dir, e))?;
            return Ok(());
        }
        self.mark(dir);
        let mut rel = dir.to_path_buf();
        self.prune(handle.as_fd(), &mut rel)
    }

    /// Removes everything under `dir` (at `rel`) that this layer did not write.
    fn prune(&mut self, dir: BorrowedFd<'_>, rel: &mut PathBuf) -> Result<(), OpError> {
        let names = list_dir(dir).map_err(|e| self.io_err_std("list", rel, e))?;
        for name in names {
            rel.push(&name);
            let result = if self.in_layer(rel) {
                self.prune_child(dir, &name, rel)
            } else {
                let dir_path = rel.parent().unwrap_or(Path::new("")).to_path_buf();
                self.preserve_dir_time(&dir_path, dir);
                match remove_entry(dir, &name) {
                    Ok(_) => {
                        self.dir_times.remove(rel.as_path());
                        self.emit(UnpackEvent::Removed { path: rel });
                        Ok(())
                    }
                    Err(e) => Err(self.io_err_std("remove", rel, e).into()),
                }
            };
            rel.pop();
            result?;
        }
        Ok(())
    }

    fn prune_child(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &mut PathBuf,
    ) -> Result<(), OpError> {
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err("stat", rel, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Ok(());
        }
        let child = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io_err("open directory", rel, e))?;
        self.prune(child.as_fd(), rel)
    }

    pub(super) fn whiteout(&mut self, target: &Path) -> Result<(), OpError> {
        if self.pool_busy() {
            self.drain_pool()?;
        }
        // A whiteout hides lower layers only; an entry of this layer with the same name stays.
        if self.in_layer(target) {
            return Ok(());
        }
        let parent = match self.root.resolve_parent(target) {
            Ok(parent) => parent,
            Err(e) if self.overlay && e.is_not_found() => {
                return Err(super::not_alone(target.parent().unwrap_or(Path::new(""))))
            }
            Err(e) if e.is_not_found() || e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if self.overlay {
            self.preserve_dir_time(target.parent().unwrap_or(Path::new("")), parent.dir());
            rustix::fs::mknodat(
                parent.dir(),
                parent.name(),
                FileType::CharacterDevice,
                Mode::empty(),
                0,
            )
            .map_err(|e| self.io_err("create the whiteout for", target, e))?;
            self.mark(target);
            return Ok(());
        }
        self.preserve_dir_time(target.parent().unwrap_or(Path::new("")), parent.dir());
        let removed = remove_entry(parent.dir(), parent.name())
            .map_err(|e| self.io_err_std("remove", target, e))?;
        if removed {
            self.dir_times.remove(target);
            self.emit(UnpackEvent::Removed { path: target });
        }
        Ok(())
    }
}

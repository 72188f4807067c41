//! The user-space resolver behind [`Strategy::Walk`](super::Strategy::Walk): a
//! component-by-component walk of `O_PATH | O_NOFOLLOW` descriptors for kernels (or seccomp
//! profiles) without `openat2`. Apart from the rest of [`Root`] because it reimplements what
//! the kernel does for the other strategy, and is read on its own when checking that the two
//! agree.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fd::OwnedFd;
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

use super::{Root, RootError, MAX_SYMLINK_HOPS};

impl Root {
    /// The user-space resolver. Returns the directory holding the final entry and the entry's
    /// name, or the directory itself and `None` when the path ends at a directory reached via
    /// `..` or is the root. With `create`, missing components are created as directories.
    pub(super) fn walk(
        &self,
        rel: &Path,
        follow_last: bool,
        create: Option<Mode>,
    ) -> Result<(OwnedFd, Option<OsString>), RootError> {
        let mode = match create {
            Some(mode) => Walk::Create(mode),
            None => Walk::Existing,
        };
        self.walk_inner(rel, follow_last, mode, &mut Vec::new())
    }

    /// [`walk`](Self::walk), also leaving in `trail` the names of the directories that lead
    /// from the root to the returned directory: the path as resolved, with no symlink in it.
    /// With [`Walk::Lenient`], a missing directory ends the walk: `trail` then holds the whole
    /// path, the rest of it appended as written, and no leaf is returned.
    pub(super) fn walk_inner(
        &self,
        rel: &Path,
        follow_last: bool,
        mode: Walk,
        trail: &mut Vec<OsString>,
    ) -> Result<(OwnedFd, Option<OsString>), RootError> {
        let create = match mode {
            Walk::Create(mode) => Some(mode),
            _ => None,
        };
        let mut queue: VecDeque<OsString> = VecDeque::new();
        push_components(&mut queue, rel.as_os_str().as_bytes(), false);
        let root = rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)
            .map_err(|e| self.io_err("open root of", rel, e))?;
        // stack[i] is the directory reached after i components; names[i] is the name of
        // stack[i + 1] inside stack[i].
        let mut stack: Vec<OwnedFd> = vec![root];
        let mut names: Vec<OsString> = Vec::new();
        let mut hops = 0u32;
        while let Some(name) = queue.pop_front() {
            if name.as_bytes() == b".." {
                if stack.len() > 1 {
                    stack.pop();
                    names.pop();
                }
                continue;
            }
            if name.as_bytes() == b"/" {
                stack.truncate(1);
                names.clear();
                continue;
            }
            let dir = stack.last().expect("the root is never popped");
            let opened = rustix::fs::openat(
                dir,
                &name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            );
            let fd = match (opened, create) {
                (Ok(fd), _) => fd,
                (Err(Errno::NOENT), Some(mode)) => {
                    match rustix::fs::mkdirat(dir, &name, mode) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(self.io_err("create directory", rel, e)),
                    }
                    rustix::fs::openat(
                        dir,
                        &name,
                        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| self.io_err("create directory", rel, e))?
                }
                (Err(e), _) => {
                    // A missing final component is not an error here: the caller may be
                    // about to create it.
                    if e == Errno::NOENT && queue.is_empty() && create.is_none() {
                        let parent = stack.pop().expect("the root is never popped");
                        *trail = names;
                        return Ok((parent, Some(name)));
                    }
                    if e == Errno::NOENT && matches!(mode, Walk::Lenient) {
                        // Nothing below a missing directory exists, so no symlink can change
                        // where the rest of the path leads.
                        names.push(name);
                        for rest in queue {
                            match rest.as_bytes() {
                                b".." => {
                                    names.pop();
                                }
                                b"/" => names.clear(),
                                _ => names.push(rest),
                            }
                        }
                        *trail = names;
                        let dir = stack.pop().expect("the root is never popped");
                        return Ok((dir, None));
                    }
                    return Err(self.io_err("resolve", rel, e));
                }
            };
            let st = rustix::fs::fstat(&fd).map_err(|e| self.io_err("stat", rel, e))?;
            let file_type = FileType::from_raw_mode(st.st_mode);
            let is_last = queue.is_empty();
            if file_type == FileType::Symlink && (!is_last || follow_last) {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(RootError::SymlinkLoop {
                        root: self.path.clone(),
                        path: rel.to_path_buf(),
                    });
                }
                let target = rustix::fs::readlinkat(&fd, "", Vec::new())
                    .map_err(|e| self.io_err("read link", rel, e))?;
                if target.as_bytes().is_empty() {
                    return Err(self.io_err("resolve", rel, Errno::NOENT));
                }
                push_components(&mut queue, target.as_bytes(), true);
                continue;
            }
            if !is_last && file_type != FileType::Directory {
                return Err(self.io_err("resolve", rel, Errno::NOTDIR));
            }
            stack.push(fd);
            names.push(name);
        }
        match names.pop() {
            None => Ok((stack.pop().expect("the root is never popped"), None)),
            Some(name) => {
                stack.pop();
                *trail = names;
                Ok((stack.pop().expect("the root is never popped"), Some(name)))
            }
        }
    }
}

/// What a walk does about components that do not exist.
#[derive(Clone, Copy)]
pub(super) enum Walk {
    /// Only the final component may be missing; anything else is an error.
    Existing,
    /// Missing directories are created with this mode.
    Create(Mode),
    /// A missing directory ends the walk, the rest of the path taken as written.
    Lenient,
}

/// Queues the components of `path` for the walk: in front (a symlink's target, to be resolved
/// before what followed the link) or at the back. A leading `/` becomes a `"/"` marker that
/// resets the walk to the root.
fn push_components(queue: &mut VecDeque<OsString>, path: &[u8], front: bool) {
    let mut parts: Vec<OsString> = Vec::new();
    if path.first() == Some(&b'/') {
        parts.push(OsString::from("/"));
    }
    parts.extend(
        path.split(|b| *b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .map(|c| OsString::from_vec(c.to_vec())),
    );
    if front {
        for part in parts.into_iter().rev() {
            queue.push_front(part);
        }
    } else {
        queue.extend(parts);
    }
}

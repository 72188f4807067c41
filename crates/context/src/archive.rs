//! Safe, streaming extraction of context tarballs (plain or gzip).
//!
//! A context archive comes from a user or a server and is untrusted: no entry may create,
//! overwrite or link anything outside the destination directory. Entries with absolute paths
//! or `..` components are rejected, as is any entry whose parent path passes through a
//! symlink (a symlink entry followed by `link/file` would otherwise write through it), and an
//! existing symlink is replaced, never written through. Symlinks themselves may point anywhere:
//! they are stored, not followed.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use kiln_fs::resolve::{Root, RootError};
use rustix::fs::{FileType, Timespec};
use tar::EntryType;

use crate::error::{ContextError, Result};

/// Wraps `reader` in a gzip decoder when its first bytes are the gzip magic, so callers need
/// not know whether an archive is compressed.
pub fn decompress_auto<R: Read + Send + 'static>(
    mut reader: R,
) -> io::Result<Box<dyn Read + Send>> {
    let mut magic = [0u8; 2];
    let mut filled = 0;
    while filled < magic.len() {
        let n = reader.read(&mut magic[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    let prefix = io::Cursor::new(magic[..filled].to_vec());
    let whole = prefix.chain(reader);
    if filled == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(MultiGzDecoder::new(whole)))
    } else {
        Ok(Box::new(whole))
    }
}

/// Extracts the tar stream `reader` into the existing directory `dest`. `source_name` names
/// the archive in errors. Every entry is created through a [`Root`] at `dest`.
pub fn extract_tar(reader: impl Read, dest: &Path, source_name: &str) -> Result<()> {
    let archive_error = |error: io::Error| ContextError::Archive {
        source_name: source_name.to_owned(),
        error,
    };
    let contained = |error: RootError| ContextError::Contained {
        source_name: source_name.to_owned(),
        error,
    };
    let unsafe_entry = |entry: &str, reason: &str| ContextError::UnsafeArchiveEntry {
        source_name: source_name.to_owned(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    let root = Root::open(dest).map_err(contained)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let running_as_root = unsafe { libc::geteuid() } == 0;

    let mut archive = tar::Archive::new(reader);
    // Directory modes and times are applied last: a read-only directory must still receive
    // its children, and writing children changes the directory's mtime.
    let mut directories: Vec<(PathBuf, u32, Option<Timespec>)> = Vec::new();

    for entry in archive.entries().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            continue;
        }
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let relative = contained_relative(&entry.path_bytes())
            .map_err(|reason| unsafe_entry(&raw_name, reason))?;
        let mode = entry.header().mode().map_err(archive_error)? & 0o7777;
        let mtime = entry.header().mtime().ok().map(|secs| Timespec {
            tv_sec: i64::try_from(secs).unwrap_or(i64::MAX),
            tv_nsec: 0,
        });
        let owner = (
            entry.header().uid().unwrap_or(0) as u32,
            entry.header().gid().unwrap_or(0) as u32,
        );

        if relative.as_os_str().is_empty() {
            // The archive's own root ("./"): only its mode matters.
            if kind == EntryType::Directory {
                directories.push((PathBuf::new(), mode, mtime));
            }
            continue;
        }
        prepare_parents(&root, &relative).map_err(|reason| match reason {
            ParentProblem::Symlink => {
                unsafe_entry(&raw_name, "its parent path passes through a symlink")
            }
            ParentProblem::NotADirectory => {
                unsafe_entry(&raw_name, "a parent path is not a directory")
            }
            ParentProblem::Root(e) => contained(e),
        })?;

        let existing = root.symlink_metadata(&relative).ok();
        let replace = |want_dir: bool| -> Result<()> {
            match &existing {
                Some(meta) if meta.is_dir() && want_dir => Ok(()),
                Some(_) => root.remove_all(&relative).map(|_| ()).map_err(contained),
                None => Ok(()),
            }
        };

        match kind {
            EntryType::Directory => {
                replace(true)?;
                root.mkdir_all(&relative, 0o755).map_err(contained)?;
                directories.push((relative.clone(), mode, mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                replace(false)?;
                let mut file = root.create_new(&relative, 0o600).map_err(contained)?;
                io::copy(&mut entry, &mut file).map_err(archive_error)?;
                drop(file);
                root.set_mode(&relative, mode).map_err(contained)?;
                if let Some(mtime) = mtime {
                    root.set_times(&relative, mtime, mtime).map_err(contained)?;
                }
            }
            EntryType::Symlink => {
                replace(false)?;
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&raw_name, "symlink without a target"))?;
                root.symlink(OsStr::from_bytes(&link), &relative)
                    .map_err(contained)?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&raw_name, "hard link without a target"))?;
                let link_relative = contained_relative(&link).map_err(|reason| {
                    unsafe_entry(&raw_name, &format!("hard link target: {reason}"))
                })?;
                if link_relative.as_os_str().is_empty() {
                    return Err(unsafe_entry(&raw_name, "hard link to the archive root"));
                }
                if passes_through_symlink(&root, &link_relative) {
                    return Err(unsafe_entry(
                        &raw_name,
                        "hard link target passes through a symlink",
                    ));
                }
                if link_relative == relative {
                    continue;
                }
                replace(false)?;
                root.hard_link(&link_relative, &relative)
                    .map_err(contained)?;
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                replace(false)?;
                let header = entry.header();
                let (file_type, device) = match kind {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    _ => {
                        let major = header.device_major().map_err(archive_error)?.unwrap_or(0);
                        let minor = header.device_minor().map_err(archive_error)?.unwrap_or(0);
                        let file_type = if kind == EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (file_type, rustix::fs::makedev(major, minor))
                    }
                };
                root.make_node(&relative, file_type, mode, device)
                    .map_err(contained)?;
            }
            other => {
                return Err(unsafe_entry(
                    &raw_name,
                    &format!("unsupported entry type {other:?}"),
                ));
            }
        }

        if running_as_root {
            root.set_owner(&relative, owner.0, owner.1)
                .map_err(contained)?;
            // chown clears setuid and setgid bits; the archive's mode is the one wanted.
            if mode & 0o6000 != 0 && kind != EntryType::Symlink {
                root.set_mode(&relative, mode).map_err(contained)?;
            }
        }
    }

    for (relative, mode, mtime) in directories.iter().rev() {
        // A later entry may have replaced the directory, or one of its parents, with a
        // symlink or a file: then there is nothing of the archive's to apply the mode to.
        if passes_through_symlink(&root, relative) {
            continue;
        }
        match root.symlink_metadata(relative) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => continue,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(contained(e)),
        }
        root.set_mode(relative, *mode).map_err(contained)?;
        if let Some(mtime) = mtime {
            root.set_times(relative, *mtime, *mtime)
                .map_err(contained)?;
        }
    }
    Ok(())
}

/// Turns an archive path into a relative path with only normal components, or says why it
/// cannot be one.
fn contained_relative(raw: &[u8]) -> std::result::Result<PathBuf, &'static str> {
    let mut relative = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains a '..' component"),
            Component::RootDir | Component::Prefix(_) => return Err("path is absolute"),
        }
    }
    Ok(relative)
}

enum ParentProblem {
    Symlink,
    NotADirectory,
    Root(RootError),
}

/// Makes sure every parent of `relative` is a real directory (creating missing ones), never a
/// symlink: a context archive has no business writing through its own links, so such an
/// entry is refused rather than followed (inside the root) as a layer's would be.
fn prepare_parents(root: &Root, relative: &Path) -> std::result::Result<(), ParentProblem> {
    let mut current = PathBuf::new();
    let components: Vec<_> = relative.components().collect();
    for component in &components[..components.len().saturating_sub(1)] {
        current.push(component);
        match root.symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(ParentProblem::Symlink),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(ParentProblem::NotADirectory),
            Err(e) if e.is_not_found() => {
                root.mkdir_all(&current, 0o755)
                    .map_err(ParentProblem::Root)?;
            }
            Err(e) => return Err(ParentProblem::Root(e)),
        }
    }
    Ok(())
}

/// Whether any existing component of `relative` (the last one included) is a symlink.
fn passes_through_symlink(root: &Root, relative: &Path) -> bool {
    let mut current = PathBuf::new();
    for component in relative.components() {
        current.push(component);
        if root
            .symlink_metadata(&current)
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return true;
        }
    }
    false
}

//! Safe, streaming extraction of context tarballs (plain or gzip).
//!
//! A context archive comes from a user or a server and is untrusted: no entry may create,
//! overwrite or link anything outside the destination directory. Entries with absolute paths
//! or `..` components are rejected, as is any entry whose parent path passes through a
//! symlink (a symlink entry followed by `link/file` would otherwise write through it), and an
//! existing symlink is replaced, never written through. Symlinks themselves may point anywhere:
//! they are stored, not followed.

use std::ffi::OsStr;
use std::fs::{self, FileTimes, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use flate2::read::MultiGzDecoder;
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
/// the archive in errors.
pub fn extract_tar(reader: impl Read, dest: &Path, source_name: &str) -> Result<()> {
    let archive_error = |error: io::Error| ContextError::Archive {
        source_name: source_name.to_owned(),
        error,
    };
    let io_error = |action: &'static str, path: &Path, error: io::Error| {
        ContextError::io(source_name, action, path, error)
    };
    let unsafe_entry = |entry: &str, reason: &str| ContextError::UnsafeArchiveEntry {
        source_name: source_name.to_owned(),
        entry: entry.to_owned(),
        reason: reason.to_owned(),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let running_as_root = unsafe { libc::geteuid() } == 0;

    let mut archive = tar::Archive::new(reader);
    // Directory modes and times are applied last: a read-only directory must still receive
    // its children, and writing children changes the directory's mtime.
    let mut directories: Vec<(PathBuf, u32, Option<SystemTime>)> = Vec::new();

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
        let mtime = entry
            .header()
            .mtime()
            .ok()
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
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
        let target = dest.join(&relative);
        prepare_parents(dest, &relative).map_err(|reason| match reason {
            ParentProblem::Symlink => {
                unsafe_entry(&raw_name, "its parent path passes through a symlink")
            }
            ParentProblem::NotADirectory => {
                unsafe_entry(&raw_name, "a parent path is not a directory")
            }
            ParentProblem::Io(path, e) => io_error("create directory", &path, e),
        })?;

        let existing = fs::symlink_metadata(&target).ok();
        let replace = |want_dir: bool| -> Result<()> {
            match &existing {
                Some(meta) if meta.is_dir() && want_dir => Ok(()),
                Some(meta) if meta.is_dir() => fs::remove_dir_all(&target)
                    .map_err(|e| io_error("replace directory", &target, e)),
                Some(_) => fs::remove_file(&target).map_err(|e| io_error("replace", &target, e)),
                None => Ok(()),
            }
        };

        match kind {
            EntryType::Directory => {
                replace(true)?;
                if !target.is_dir() {
                    fs::create_dir(&target)
                        .map_err(|e| io_error("create directory", &target, e))?;
                }
                directories.push((relative.clone(), mode, mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                replace(false)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|e| io_error("create", &target, e))?;
                io::copy(&mut entry, &mut file).map_err(archive_error)?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| io_error("set mode of", &target, e))?;
                if let Some(mtime) = mtime {
                    file.set_times(FileTimes::new().set_modified(mtime))
                        .map_err(|e| io_error("set times of", &target, e))?;
                }
            }
            EntryType::Symlink => {
                replace(false)?;
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&raw_name, "symlink without a target"))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target)
                    .map_err(|e| io_error("create symlink", &target, e))?;
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
                if passes_through_symlink(dest, &link_relative) {
                    return Err(unsafe_entry(
                        &raw_name,
                        "hard link target passes through a symlink",
                    ));
                }
                let source = dest.join(&link_relative);
                if source == target {
                    continue;
                }
                replace(false)?;
                fs::hard_link(&source, &target).map_err(|e| io_error("hard link", &target, e))?;
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                replace(false)?;
                make_node(&entry, kind, mode, &target)
                    .map_err(|e| io_error("create device node", &target, e))?;
            }
            other => {
                return Err(unsafe_entry(
                    &raw_name,
                    &format!("unsupported entry type {other:?}"),
                ));
            }
        }

        if running_as_root {
            std::os::unix::fs::lchown(&target, Some(owner.0), Some(owner.1))
                .map_err(|e| io_error("set owner of", &target, e))?;
        }
    }

    for (relative, mode, mtime) in directories.iter().rev() {
        // A later entry may have replaced the directory, or one of its parents, with a
        // symlink; applying the mode through it would change something outside `dest`.
        if passes_through_symlink(dest, relative) {
            continue;
        }
        let path = dest.join(relative);
        let dir = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
            .open(&path)
        {
            Ok(dir) => dir,
            // Replaced by a file or removed by a later entry: nothing to apply.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("open", &path, e)),
        };
        dir.set_permissions(fs::Permissions::from_mode(*mode))
            .map_err(|e| io_error("set mode of", &path, e))?;
        if let Some(mtime) = mtime {
            dir.set_times(FileTimes::new().set_modified(*mtime))
                .map_err(|e| io_error("set times of", &path, e))?;
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
    Io(PathBuf, io::Error),
}

/// Makes sure every parent of `relative` under `dest` is a real directory (creating missing
/// ones), never a symlink.
fn prepare_parents(dest: &Path, relative: &Path) -> std::result::Result<(), ParentProblem> {
    let mut current = dest.to_path_buf();
    let components: Vec<_> = relative.components().collect();
    for component in &components[..components.len().saturating_sub(1)] {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(ParentProblem::Symlink),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(ParentProblem::NotADirectory),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&current).map_err(|e| ParentProblem::Io(current.clone(), e))?;
            }
            Err(e) => return Err(ParentProblem::Io(current.clone(), e)),
        }
    }
    Ok(())
}

/// Whether any existing component of `relative` under `dest` (the last one included) is a
/// symlink.
fn passes_through_symlink(dest: &Path, relative: &Path) -> bool {
    let mut current = dest.to_path_buf();
    for component in relative.components() {
        current.push(component);
        if fs::symlink_metadata(&current).is_ok_and(|m| m.file_type().is_symlink()) {
            return true;
        }
    }
    false
}

fn make_node<R: Read>(
    entry: &tar::Entry<'_, R>,
    kind: EntryType,
    mode: u32,
    target: &Path,
) -> io::Result<()> {
    use std::ffi::CString;
    let path = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let header = entry.header();
    let (file_type, device) = match kind {
        EntryType::Fifo => (libc::S_IFIFO, 0),
        EntryType::Char | EntryType::Block => {
            let major = header.device_major()?.unwrap_or(0);
            let minor = header.device_minor()?.unwrap_or(0);
            let file_type = if kind == EntryType::Char {
                libc::S_IFCHR
            } else {
                libc::S_IFBLK
            };
            (file_type, libc::makedev(major, minor))
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a device node",
            ))
        }
    };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mknod(path.as_ptr(), file_type | (mode & 0o7777), device) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // mknod honours the umask; the archive's mode is the one wanted.
    fs::set_permissions(target, fs::Permissions::from_mode(mode))
}

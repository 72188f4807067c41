//! Flattened descriptions of a directory tree, for comparing two root filesystems (Kiln's unpack
//! against umoci's, Kiln's image against buildah's) and printing what differs.
//!
//! Records, per path: type, permission bits (with setuid/setgid/sticky), owner, content hash,
//! symlink target, device numbers, xattrs, and hardlink groups. Modification times are left out
//! on purpose: two builders never agree on them.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What one path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file and the sha256 of its content.
    File {
        /// Content hash, hex.
        sha256: String,
    },
    /// A directory.
    Dir,
    /// A symbolic link and its target, unresolved.
    Symlink {
        /// The link's target exactly as stored.
        target: PathBuf,
    },
    /// A character device.
    CharDevice {
        /// Device number.
        rdev: u64,
    },
    /// A block device.
    BlockDevice {
        /// Device number.
        rdev: u64,
    },
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

/// One path's recorded facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Type and type-specific data.
    pub kind: Kind,
    /// Mode bits without the file type (`0o7777` mask).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Extended attributes, name to hex value.
    pub xattrs: BTreeMap<String, String>,
    /// For regular files with more than one link inside the tree: the smallest path of the
    /// group, so two trees agree on hardlink structure regardless of inode numbers.
    pub hardlink_group: Option<PathBuf>,
}

/// A whole tree: relative path (without leading `/`; the root itself is `.`) to its entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// Every path below the root, sorted.
    pub entries: BTreeMap<PathBuf, Entry>,
}

/// Paths to leave out of a scan, relative to the root (the path and everything below it).
pub type Exclusions<'a> = &'a [&'a str];

impl Tree {
    /// Scans `root` without following symlinks. Paths in `exclude` (relative, e.g. `"proc"`)
    /// are skipped with their subtrees.
    pub fn scan(root: &Path, exclude: Exclusions<'_>) -> std::io::Result<Tree> {
        let mut entries = BTreeMap::new();
        let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
        let mut stack = vec![PathBuf::from(".")];
        while let Some(rel) = stack.pop() {
            let abs = root.join(&rel);
            let meta = std::fs::symlink_metadata(&abs)?;
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                let mut children: Vec<_> = std::fs::read_dir(&abs)?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()?;
                children.sort();
                for name in children {
                    let child = if rel == Path::new(".") {
                        PathBuf::from(&name)
                    } else {
                        rel.join(&name)
                    };
                    if !exclude.iter().any(|x| child.starts_with(x)) {
                        stack.push(child);
                    }
                }
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink {
                    target: std::fs::read_link(&abs)?,
                }
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    inodes
                        .entry((meta.dev(), meta.ino()))
                        .or_default()
                        .push(rel.clone());
                }
                let mut hasher = Sha256::new();
                std::io::copy(&mut std::fs::File::open(&abs)?, &mut hasher)?;
                Kind::File {
                    sha256: hex::encode(hasher.finalize()),
                }
            } else if ft.is_char_device() {
                Kind::CharDevice { rdev: meta.rdev() }
            } else if ft.is_block_device() {
                Kind::BlockDevice { rdev: meta.rdev() }
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            };
            let entry = Entry {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                xattrs: xattrs(&abs)?,
                hardlink_group: None,
            };
            entries.insert(rel, entry);
        }
        for group in inodes.values().filter(|g| g.len() > 1) {
            let leader = group.iter().min().cloned();
            for path in group {
                if let Some(entry) = entries.get_mut(path) {
                    entry.hardlink_group.clone_from(&leader);
                }
            }
        }
        Ok(Tree { entries })
    }

    /// The differences between `self` (left) and `other` (right), one line per path; empty when
    /// the trees are identical.
    pub fn diff(&self, other: &Tree) -> TreeDiff {
        let mut lines = Vec::new();
        for (path, left) in &self.entries {
            match other.entries.get(path) {
                None => lines.push(format!("only left:  {}  {left:?}", path.display())),
                Some(right) if right != left => lines.push(format!(
                    "differs:    {}\n    left:  {left:?}\n    right: {right:?}",
                    path.display()
                )),
                Some(_) => {}
            }
        }
        for (path, right) in &other.entries {
            if !self.entries.contains_key(path) {
                lines.push(format!("only right: {}  {right:?}", path.display()));
            }
        }
        TreeDiff { lines }
    }
}

/// The result of [`Tree::diff`]: printable, and empty when the trees match.
#[derive(Debug, Clone, Default)]
pub struct TreeDiff {
    /// One human-readable line (or block) per differing path.
    pub lines: Vec<String>,
}

impl TreeDiff {
    /// Whether the two trees were identical.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

impl fmt::Display for TreeDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 40;
        for line in self.lines.iter().take(SHOWN) {
            writeln!(f, "{line}")?;
        }
        if self.lines.len() > SHOWN {
            writeln!(f, "... and {} more differences", self.lines.len() - SHOWN)?;
        }
        Ok(())
    }
}

fn xattrs(path: &Path) -> std::io::Result<BTreeMap<String, String>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut names = vec![0u8; 4096];
    // SAFETY: buffers are valid for their stated lengths; llistxattr does not follow symlinks.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(BTreeMap::new()),
            _ => Err(err),
        };
    }
    let mut out = BTreeMap::new();
    for name in names[..len as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let c_name = CString::new(name).expect("xattr names have no NUL");
        let mut value = vec![0u8; 65536];
        // SAFETY: as above; value buffer is 64 KiB, the Linux maximum xattr size.
        let vlen = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if vlen < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.insert(
            String::from_utf8_lossy(name).into_owned(),
            hex::encode(&value[..vlen as usize]),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_kind_of_difference() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            std::fs::create_dir(root.join("d")).unwrap();
            std::fs::write(root.join("d/f"), "same").unwrap();
            std::fs::hard_link(root.join("d/f"), root.join("g")).unwrap();
            std::os::unix::fs::symlink("d/f", root.join("l")).unwrap();
        }
        let left = Tree::scan(a.path(), &[]).unwrap();
        assert!(left.diff(&Tree::scan(b.path(), &[]).unwrap()).is_empty());
        assert_eq!(
            left.entries[Path::new("g")].hardlink_group.as_deref(),
            Some(Path::new("d/f"))
        );

        std::fs::write(b.path().join("d/f"), "changed").unwrap();
        std::fs::remove_file(b.path().join("l")).unwrap();
        std::os::unix::fs::symlink("elsewhere", b.path().join("l")).unwrap();
        std::fs::write(b.path().join("extra"), "").unwrap();
        let diff = left.diff(&Tree::scan(b.path(), &[]).unwrap());
        let text = diff.to_string();
        assert!(text.contains("differs:    d/f"), "{text}");
        assert!(text.contains("differs:    l"), "{text}");
        assert!(text.contains("only right: extra"), "{text}");
        assert!(!Tree::scan(b.path(), &["extra"])
            .unwrap()
            .entries
            .contains_key(Path::new("extra")));
    }
}

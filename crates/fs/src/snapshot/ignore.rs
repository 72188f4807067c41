//! Paths a snapshot never walks: mount points, kernel filesystems, Kiln's own directory and
//! whatever the user adds with `--ignore-path`.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use std::os::unix::ffi::OsStrExt;

use super::index::{key_of, Key};

/// Where the ignore list comes from.
#[derive(Debug, Clone)]
pub struct IgnoreOptions {
    /// Ignore `/proc`, `/sys`, `/dev`, `/kiln` and `/kaniko` (relative to the root). On by
    /// default, for a root that is a machine's `/` (in-place mode); off for a root of its own
    /// (a chroot stage's rootfs), where those paths hold the image's files.
    pub system_paths: bool,
    /// Ignore `/var/run` (kaniko's `--ignore-var-run`, default true).
    pub var_run: bool,
    /// Ignore every mount point under the root listed in `/proc/self/mountinfo`.
    pub mount_points: bool,
    /// Extra paths (`--ignore-path`), absolute inside the rootfs or relative to it.
    pub extra: Vec<PathBuf>,
}

impl Default for IgnoreOptions {
    fn default() -> Self {
        IgnoreOptions {
            system_paths: true,
            var_run: true,
            mount_points: true,
            extra: Vec::new(),
        }
    }
}

/// The resolved set of ignored paths, relative to the root. An ignored path and everything
/// below it is neither walked nor reported; index entries under it are kept as they were.
#[derive(Debug, Clone, Default)]
pub struct IgnoreSet {
    paths: HashSet<Key>,
}

impl IgnoreSet {
    /// Resolves `options` for the rootfs at `root`, reading `/proc/self/mountinfo` if asked to.
    pub fn resolve(root: &Path, options: &IgnoreOptions) -> io::Result<IgnoreSet> {
        let mut paths: HashSet<Key> = HashSet::new();
        if options.system_paths {
            for p in ["proc", "sys", "dev", "kiln", "kaniko"] {
                paths.insert(p.as_bytes().to_vec());
            }
        }
        if options.var_run {
            paths.insert(b"var/run".to_vec());
        }
        for extra in &options.extra {
            let rel = key_of(extra);
            if !rel.is_empty() {
                paths.insert(rel);
            }
        }
        if options.mount_points {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
            let root = std::fs::canonicalize(root)?;
            for mount_point in mount_points(&mountinfo) {
                if let Ok(rel) = mount_point.strip_prefix(&root) {
                    if !rel.as_os_str().is_empty() {
                        paths.insert(key_of(rel));
                    }
                }
            }
        }
        Ok(IgnoreSet { paths })
    }

    /// Whether exactly this path is ignored (the walk never descends below an ignored path, so
    /// it only needs this check).
    pub(crate) fn is_ignored_exact(&self, rel: &[u8]) -> bool {
        !self.paths.is_empty() && self.paths.contains(rel)
    }

    /// Whether the path or one of its ancestors is ignored.
    pub fn is_ignored(&self, rel: &Path) -> bool {
        self.is_key_ignored(rel.as_os_str().as_bytes())
    }

    /// [`IgnoreSet::is_ignored`] on an index key.
    pub(crate) fn is_key_ignored(&self, key: &[u8]) -> bool {
        if self.paths.is_empty() {
            return false;
        }
        let mut end = key.len();
        loop {
            if self.paths.contains(&key[..end]) {
                return true;
            }
            match key[..end].iter().rposition(|b| *b == b'/') {
                Some(slash) => end = slash,
                None => return false,
            }
        }
    }

    /// The ignored paths, relative to the root.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.paths.iter().map(|k| super::index::as_path(k))
    }
}

/// Mount points (field 5) of a `/proc/self/mountinfo` text, with the kernel's octal escapes
/// (`\040` for space and so on) decoded.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| {
            let bytes = escaped.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                let octal = bytes
                    .get(i + 1..i + 4)
                    .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
                match (bytes[i], octal) {
                    (b'\\', Some(d)) => {
                        out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                        i += 4;
                    }
                    (b, _) => {
                        out.push(b);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_mountinfo_escapes() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            mount_points(text),
            vec![PathBuf::from("/mnt/with space"), PathBuf::from("/proc")]
        );
    }

    #[test]
    fn ancestors_of_ignored_paths_are_not_ignored() {
        let set = IgnoreSet::resolve(
            Path::new("/nonexistent-root"),
            &IgnoreOptions {
                mount_points: false,
                ..IgnoreOptions::default()
            },
        )
        .unwrap();
        assert!(set.is_ignored(Path::new("proc/1/status")));
        assert!(set.is_ignored(Path::new("var/run")));
        assert!(!set.is_ignored(Path::new("var")));
        assert!(!set.is_ignored(Path::new("procfs")));
    }
}

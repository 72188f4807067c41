//! Layer building helpers shared by the unpack integration tests. Headers are written field by
//! field where the `tar` crate's safe setters refuse hostile names.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The fixed mtime every test entry gets, so trees compare deterministically.
pub const MTIME: u64 = 1_600_000_000;

/// A tar stream built entry by entry.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Self {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(name: &[u8], kind: tar::EntryType, size: u64, link: &[u8], mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(MTIME);
        header.set_uid(0);
        header.set_gid(0);
        {
            let old = header.as_old_mut();
            assert!(
                name.len() <= 100 && link.len() <= 100,
                "use pax_* for long names"
            );
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_cksum();
        header
    }

    /// A directory (mode 0755 unless `mode` says otherwise).
    pub fn dir(mut self, name: &str) -> Self {
        self.raw(name.as_bytes(), tar::EntryType::Directory, b"", b"", 0o755);
        self
    }

    /// A directory with explicit mode and owner.
    pub fn dir_owned(mut self, name: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut header = Self::header(name.as_bytes(), tar::EntryType::Directory, 0, b"", mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    /// A regular file, mode 0644.
    pub fn file(mut self, name: &str, content: &[u8]) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Regular,
            content,
            b"",
            0o644,
        );
        self
    }

    /// A regular file with explicit mode and owner.
    pub fn file_owned(mut self, name: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut header = Self::header(
            name.as_bytes(),
            tar::EntryType::Regular,
            content.len() as u64,
            b"",
            mode,
        );
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_cksum();
        self.builder.append(&header, content).unwrap();
        self
    }

    /// A symlink.
    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Symlink,
            b"",
            target.as_bytes(),
            0o777,
        );
        self
    }

    /// A hard link to `target` (a name inside the layer's root).
    pub fn hardlink(mut self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Link,
            b"",
            target.as_bytes(),
            0o644,
        );
        self
    }

    /// A character/block device or FIFO.
    pub fn node(mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut header = Self::header(name.as_bytes(), kind, 0, b"", 0o640);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    /// Any entry with raw name bytes, written without validation.
    pub fn raw(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        content: &[u8],
        link: &[u8],
        mode: u32,
    ) {
        let header = Self::header(name, kind, content.len() as u64, link, mode);
        self.builder.append(&header, content).unwrap();
    }

    /// A regular file preceded by a PAX header with the given records (e.g. `path`, xattrs).
    pub fn pax_file(
        mut self,
        records: &[(&str, &[u8])],
        name: &str,
        content: &[u8],
        mode: u32,
    ) -> Self {
        self.pax(records);
        self.raw(name.as_bytes(), tar::EntryType::Regular, content, b"", mode);
        self
    }

    /// A PAX extended header applying to the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) {
        let mut data = Vec::new();
        for (key, value) in records {
            // "LEN key=value\n" where LEN counts itself.
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while len.to_string().len() + rest != len {
                len = len.to_string().len() + rest;
            }
            write!(data, "{len} {key}=").unwrap();
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let header = Self::header(
            b"././@PaxHeader",
            tar::EntryType::XHeader,
            data.len() as u64,
            b"",
            0o644,
        );
        self.builder.append(&header, &data[..]).unwrap();
    }

    /// The finished tar bytes (with the end-of-archive blocks).
    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }

    /// The finished layer, gzip-compressed.
    pub fn gzip(self) -> Vec<u8> {
        gzip(&self.tar())
    }
}

/// gzip-compresses `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// Every path under `root` (relative, sorted, directories walked without following symlinks)
/// with what `describe` says of it from its full path and `lstat`.
pub fn describe_tree(
    root: &Path,
    describe: &dyn Fn(&Path, &std::fs::Metadata) -> String,
) -> BTreeMap<String, String> {
    fn walk(
        root: &Path,
        rel: &Path,
        describe: &dyn Fn(&Path, &std::fs::Metadata) -> String,
        out: &mut BTreeMap<String, String>,
    ) {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let rel = rel.join(name);
            let path = root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            out.insert(rel.display().to_string(), describe(&path, &meta));
            if meta.is_dir() {
                walk(root, &rel, describe, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), describe, &mut out);
    out
}

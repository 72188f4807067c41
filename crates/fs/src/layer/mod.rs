//! The layer writer: turns a snapshot [`Diff`] into a layer tar, compresses and digests it in
//! the same pass and stores it in a [`BlobStore`].
//!
//! What goes in, in order (paths sorted component by component, so a directory always precedes
//! its contents):
//! - every added or modified path with its current metadata; directories end in `/`;
//! - the parent directories of every entry, changed or not, as BuildKit emits them, so a layer
//!   applied on its own still gets the right owners and modes;
//! - a whiteout `DIR/.wh.NAME` for each deleted path, one for a whole deleted tree;
//! - for a directory that was removed and created again, its entry, then the opaque marker
//!   `DIR/.wh..wh..opq`, then everything it now contains;
//! - the second and later paths of a hard-linked inode as hardlink entries naming the first
//!   (relative names); a link whose other names are outside the layer carries the content;
//! - symlinks, character and block devices, FIFOs; sockets are skipped;
//! - extended attributes as PAX `SCHILY.xattr.NAME` records, except `security.selinux` (a host
//!   label) and `trusted.overlay.*` (overlayfs bookkeeping).
//!
//! No user or group names, and whole-second mtimes, so the same tree gives the same bytes. With
//! `source_date_epoch`, mtimes newer than it are clamped to it.

pub(crate) mod tar;

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_oci::Digest;
use rustix::fs::OFlags;

use crate::blobstore::{BlobStore, BlobStoreError};
use crate::compress::{Compression, Compressor};
use crate::snapshot::walk::{self, Root};
use crate::snapshot::{ChangeKind, Diff, Entry, FileKind};

use self::tar::{typeflag, Header};

/// Why writing a layer failed.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A path of the rootfs could not be read.
    #[error("layer of {root}: reading {path}: {source}")]
    Read {
        /// The rootfs.
        root: PathBuf,
        /// The path relative to the root.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file changed size between the snapshot and the layer writer reading it.
    #[error("layer of {root}: {path} changed while the layer was written (snapshot size {expected}, now {actual})")]
    Changed {
        /// The rootfs.
        root: PathBuf,
        /// The path relative to the root.
        path: PathBuf,
        /// Size recorded by the snapshot.
        expected: u64,
        /// Size found when reading.
        actual: u64,
    },
    /// Writing the compressed stream failed.
    #[error("writing layer: {0}")]
    Write(#[source] io::Error),
    /// The blob store failed.
    #[error(transparent)]
    Store(#[from] BlobStoreError),
}

/// How a layer is written.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Compression of the blob.
    pub compression: Compression,
    /// Compression threads (gzip).
    pub threads: usize,
    /// `SOURCE_DATE_EPOCH`: entries with a newer mtime get this one.
    pub source_date_epoch: Option<i64>,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            compression: Compression::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            source_date_epoch: None,
        }
    }
}

/// A layer blob in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Size of the compressed blob.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// OCI media type for the manifest.
    pub media_type: &'static str,
    /// Where the blob is stored.
    pub path: PathBuf,
}

/// Writes the layer of `diff` (taken on the rootfs at `root`) into `store`.
pub fn write_layer(
    root: &Path,
    diff: &Diff,
    store: &BlobStore,
    options: &LayerOptions,
) -> Result<LayerBlob, LayerError> {
    let blob = store.create()?;
    let mut compressor =
        Compressor::new(blob, options.compression, options.threads).map_err(LayerError::Write)?;
    write_tar(root, diff, &mut compressor, options.source_date_epoch)?;
    let (blob, summary) = compressor.finish().map_err(LayerError::Write)?;
    let path = blob.commit(&summary.digest)?;
    Ok(LayerBlob {
        digest: summary.digest,
        size: summary.size,
        diff_id: summary.diff_id,
        uncompressed_size: summary.uncompressed_size,
        media_type: options.compression.oci_layer_media_type(),
        path,
    })
}

/// Writes the uncompressed layer tar of `diff` to `out`.
pub fn write_tar<W: Write>(
    root: &Path,
    diff: &Diff,
    out: W,
    source_date_epoch: Option<i64>,
) -> Result<W, LayerError> {
    let opened = walk::open_root(root).map_err(|source| LayerError::Read {
        root: root.to_path_buf(),
        path: PathBuf::new(),
        source,
    })?;
    let mut writer = TarWriter {
        root: &opened,
        out,
        source_date_epoch,
        by_path: diff
            .changes
            .iter()
            .map(|c| (c.path.as_path(), c.kind_and_entry()))
            .collect(),
        emitted_dirs: HashSet::new(),
        links: HashMap::new(),
        buf: vec![0u8; 128 * 1024],
    };
    for change in &diff.changes {
        match (&change.kind, &change.entry) {
            (ChangeKind::Deleted, _) | (_, None) => writer.whiteout(&change.path)?,
            (kind, Some(entry)) => {
                writer.parents(&change.path)?;
                writer.entry(&change.path, entry)?;
                if *kind == ChangeKind::Replaced {
                    let marker = change.path.join(".wh..wh..opq");
                    writer.marker(&marker)?;
                }
            }
        }
    }
    tar::write_end(&mut writer.out).map_err(LayerError::Write)?;
    Ok(writer.out)
}

impl crate::snapshot::Change {
    fn kind_and_entry(&self) -> (ChangeKind, Option<FileKind>) {
        (self.kind, self.entry.as_ref().map(|e| e.kind))
    }
}

struct TarWriter<'a, W: Write> {
    root: &'a Root,
    out: W,
    source_date_epoch: Option<i64>,
    by_path: HashMap<&'a Path, (ChangeKind, Option<FileKind>)>,
    emitted_dirs: HashSet<PathBuf>,
    links: HashMap<(u64, u64), PathBuf>,
    buf: Vec<u8>,
}

/// Xattrs that describe the host rather than the image.
fn keep_xattr(name: &[u8]) -> bool {
    name != b"security.selinux" && !name.starts_with(b"trusted.overlay.")
}

impl<W: Write> TarWriter<'_, W> {
    fn read_err(&self, path: &Path) -> impl FnOnce(io::Error) -> LayerError {
        let root = self.root.path.clone();
        let path = path.to_path_buf();
        move |source| LayerError::Read { root, path, source }
    }

    fn clamp(&self, mtime: i64) -> i64 {
        match self.source_date_epoch {
            Some(epoch) if mtime > epoch => epoch,
            _ => mtime,
        }
    }

    /// A deletion: one whiteout, unless something above it already hides it (a deleted or
    /// replaced ancestor, or an ancestor that is no longer a directory).
    fn whiteout(&mut self, path: &Path) -> Result<(), LayerError> {
        let hidden = path.ancestors().skip(1).any(|a| match self.by_path.get(a) {
            Some((ChangeKind::Deleted | ChangeKind::Replaced, _)) => true,
            Some((_, Some(kind))) => *kind != FileKind::Directory,
            _ => false,
        });
        if hidden {
            return Ok(());
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(());
        };
        self.parents(path)?;
        let mut wh = name.as_bytes().to_vec();
        wh.splice(0..0, b".wh.".iter().copied());
        let marker = parent.join(std::ffi::OsStr::from_bytes(&wh));
        self.marker(&marker)
    }

    /// An empty regular file used as a whiteout or opaque marker.
    fn marker(&mut self, path: &Path) -> Result<(), LayerError> {
        let header = Header {
            path: path.as_os_str().as_bytes(),
            typeflag: typeflag::REGULAR,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            linkname: b"",
            devmajor: 0,
            devminor: 0,
            xattrs: &[],
        };
        tar::write_header(&mut self.out, &header).map_err(LayerError::Write)
    }

    /// Emits the not yet emitted ancestors of `path`, top down, with their current metadata.
    fn parents(&mut self, path: &Path) -> Result<(), LayerError> {
        let mut missing: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty() && !self.emitted_dirs.contains(*a))
            .collect();
        missing.reverse();
        for dir in missing {
            let entry = walk::stat_beneath(self.root, dir).map_err(self.read_err(dir))?;
            self.entry(dir, &entry)?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, entry: &Entry) -> Result<(), LayerError> {
        let mut name = path.as_os_str().as_bytes().to_vec();
        let mut linkname: Vec<u8> = Vec::new();
        let mut size = 0;
        let tflag = match entry.kind {
            FileKind::Socket => return Ok(()),
            FileKind::Directory => {
                name.push(b'/');
                self.emitted_dirs.insert(path.to_path_buf());
                typeflag::DIRECTORY
            }
            FileKind::Regular => {
                let first = if entry.nlink > 1 {
                    match self.links.get(&(entry.dev, entry.ino)) {
                        Some(first) => Some(first.clone()),
                        None => {
                            self.links
                                .insert((entry.dev, entry.ino), path.to_path_buf());
                            None
                        }
                    }
                } else {
                    None
                };
                match first {
                    Some(first) => {
                        linkname = first.as_os_str().as_bytes().to_vec();
                        typeflag::HARDLINK
                    }
                    None => {
                        size = entry.size;
                        typeflag::REGULAR
                    }
                }
            }
            FileKind::Symlink => {
                let (parent, file) = (
                    path.parent().unwrap_or(Path::new("")),
                    path.file_name().unwrap_or_default(),
                );
                let dir = walk::open_beneath(self.root, parent, OFlags::PATH | OFlags::DIRECTORY)
                    .map_err(self.read_err(path))?;
                let target = rustix::fs::readlinkat(&dir, file, Vec::new())
                    .map_err(|e| self.read_err(path)(e.into()))?;
                linkname = target.into_bytes();
                typeflag::SYMLINK
            }
            FileKind::CharDevice => typeflag::CHAR,
            FileKind::BlockDevice => typeflag::BLOCK,
            FileKind::Fifo => typeflag::FIFO,
        };
        let xattrs: Vec<(Vec<u8>, Vec<u8>)> = if tflag == typeflag::HARDLINK {
            Vec::new()
        } else {
            walk::read_xattrs(self.root, path)
                .map_err(self.read_err(path))?
                .into_iter()
                .filter(|(k, _)| keep_xattr(k))
                .collect()
        };
        let header = Header {
            path: &name,
            typeflag: tflag,
            mode: entry.mode,
            uid: u64::from(entry.uid),
            gid: u64::from(entry.gid),
            size,
            mtime: self.clamp(entry.mtime.sec),
            linkname: &linkname,
            devmajor: libc::major(entry.rdev),
            devminor: libc::minor(entry.rdev),
            xattrs: &xattrs,
        };
        tar::write_header(&mut self.out, &header).map_err(LayerError::Write)?;
        if size > 0 || tflag == typeflag::REGULAR {
            self.content(path, size)?;
        }
        Ok(())
    }

    /// Copies exactly `size` bytes of a regular file, failing if it no longer has that size.
    fn content(&mut self, path: &Path, size: u64) -> Result<(), LayerError> {
        let fd =
            walk::open_beneath(self.root, path, OFlags::RDONLY).map_err(self.read_err(path))?;
        let mut file = std::fs::File::from(fd);
        let actual = file.metadata().map_err(self.read_err(path))?.len();
        let changed = |actual| LayerError::Changed {
            root: self.root.path.clone(),
            path: path.to_path_buf(),
            expected: size,
            actual,
        };
        if actual != size {
            return Err(changed(actual));
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = file
                .read(&mut self.buf[..want])
                .map_err(self.read_err(path))?;
            if n == 0 {
                return Err(changed(size - left));
            }
            self.out
                .write_all(&self.buf[..n])
                .map_err(LayerError::Write)?;
            left -= n as u64;
        }
        self.out
            .write_all(tar::padding(size))
            .map_err(LayerError::Write)
    }
}

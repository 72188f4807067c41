//! A layer turned into an EROFS image that indexes its tar (see [`crate::erofs`]): the tar is
//! written into the image as it streams in, and its entries become an in-memory tree with the
//! same rules [`super::unpack_layer_tree`] applies on disk (later entries replace earlier ones,
//! directories merge, whiteouts and opaque markers in overlayfs's form), then the image's
//! metadata.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use kiln_oci::{Algorithm, Digest};

use super::apply::meta::{read_meta, EntryMeta};
use super::apply::OpError;
use super::name::{self, Special};
use super::{stream, UnpackError, UnpackReport};
use crate::erofs::{self, ImageError, Inode, Kind, Tree};
use crate::resolve::RootError;

const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
/// The most entries a layer image is made for. The tree is held in memory until the metadata
/// is written (about 200 bytes an entry); a larger layer is unpacked into a directory, which
/// streams.
const MAX_INODES: usize = 1_000_000;

/// Writes the layer read from `layer` (blob digest `digest`, verified, and diff ID `diff_id`
/// when given) as an EROFS image into `image`, a new file. The image only makes sense alone,
/// as an overlay lower dir: a layer that needs the layers below it is refused with
/// [`UnpackError::InvalidEntry`] as [`super::unpack_layer_tree`] refuses it, and so is one this
/// format does not hold (a sparse file, an xattr outside the `user`, `trusted`, `security` and
/// POSIX ACL namespaces, an entry whose parent is a symlink, more than a million entries). On
/// error the file must be discarded.
pub fn unpack_layer_image<R: Read>(
    image: &Path,
    layer: R,
    digest: &Digest,
    diff_id: Option<&Digest>,
) -> Result<UnpackReport, UnpackError> {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| write_error(digest, image, e))?;
    let stream_err = |offset: u64, source: io::Error| UnpackError::Stream {
        layer: digest.clone(),
        offset,
        source,
    };
    let mut compressed = stream::HashingReader::new(layer, digest.algorithm());
    let mut compression = None;
    let mut builder = Builder::new(digest);
    let indexed: Result<(Digest, u64), UnpackError> = (|| {
        let (detected, decoder) = super::decompressed(&mut compressed, digest)?;
        compression = Some(detected);
        let tar_stream = stream::HashingReader::new(decoder, Algorithm::Sha256);
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        out.seek(SeekFrom::Start(erofs::TAR_OFFSET))
            .map_err(|e| write_error(digest, image, e))?;
        let mut tee = Tee {
            inner: tar_stream,
            out,
            failed: None,
        };
        let read = (|| {
            let mut archive = tar::Archive::new(&mut tee);
            for entry in archive.entries()? {
                let mut entry = entry?;
                if let Err(e) = builder.add(&mut entry) {
                    return Ok(Err(e));
                }
            }
            io::copy(&mut tee, &mut io::sink())?;
            Ok::<_, io::Error>(Ok(()))
        })();
        if let Some(e) = tee.failed.take() {
            return Err(write_error(digest, image, e));
        }
        match read {
            Err(e) => return Err(stream_err(0, e)),
            Ok(Err(refused)) => return Err(refused),
            Ok(Ok(())) => {}
        }
        tee.out.flush().map_err(|e| write_error(digest, image, e))?;
        Ok(tee.inner.finish())
    })();
    // The blob's bytes decide first, as for an unpack: a corrupted blob is reported as such.
    let offset = compressed.len();
    let (actual, size) = match compressed.drain_and_finish() {
        Ok(done) => done,
        Err(source) => {
            return Err(match indexed {
                Err(e) => e,
                Ok(_) => stream_err(offset, source),
            })
        }
    };
    if &actual != digest {
        return Err(UnpackError::DigestMismatch {
            expected: digest.clone(),
            actual,
            size,
        });
    }
    let (tar_digest, tar_size) = indexed.map_err(|e| match e {
        UnpackError::Stream { layer, source, .. } => UnpackError::Stream {
            layer,
            offset,
            source,
        },
        other => other,
    })?;
    if let Some(expected) = diff_id {
        if expected != &tar_digest {
            return Err(UnpackError::DiffIdMismatch {
                layer: digest.clone(),
                expected: expected.clone(),
                actual: tar_digest,
            });
        }
    }
    let entries = builder.entries;
    let compression = compression.expect("known once the tar was read");
    erofs::write_metadata(&file, image, &builder.tree, erofs::TAR_OFFSET + tar_size).map_err(
        |e| match e {
            ImageError::Unsupported(reason) => UnpackError::InvalidEntry {
                layer: digest.clone(),
                entry: String::new(),
                reason,
            },
            ImageError::Io { source, .. } => write_error(digest, image, source),
        },
    )?;
    Ok(UnpackReport {
        digest: actual,
        diff_id: tar_digest,
        compression,
        compressed_size: size,
        uncompressed_size: tar_size,
        entries,
        skipped: Vec::new(),
    })
}

fn write_error(digest: &Digest, image: &Path, source: io::Error) -> UnpackError {
    UnpackError::Apply {
        layer: digest.clone(),
        entry: String::new(),
        source: Box::new(RootError::Io {
            op: "write the layer image",
            root: image.parent().unwrap_or(Path::new("/")).to_path_buf(),
            path: image
                .file_name()
                .map(Path::new)
                .unwrap_or(image)
                .to_path_buf(),
            source,
        }),
    }
}

/// Passes the tar through to its reader and writes every byte read into the image, so the
/// tar lands in the image exactly as it was read, offsets included.
struct Tee<'f, R> {
    inner: R,
    out: BufWriter<&'f File>,
    /// The first write that failed; reads fail from then on.
    failed: Option<io::Error>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed.is_some() {
            return Err(io::Error::other("writing the layer image failed"));
        }
        let n = self.inner.read(buf)?;
        if let Err(e) = self.out.write_all(&buf[..n]) {
            self.failed = Some(e);
            return Err(io::Error::other("writing the layer image failed"));
        }
        Ok(n)
    }
}

/// The tree the entries describe so far.
struct Builder<'a> {
    layer: &'a Digest,
    tree: Tree,
    entries: u64,
}

impl<'a> Builder<'a> {
    fn new(layer: &'a Digest) -> Builder<'a> {
        Builder {
            layer,
            tree: Tree {
                inodes: vec![Inode::new(Kind::Directory(BTreeMap::new()), 0o755)],
            },
            entries: 0,
        }
    }

    fn add<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let invalid = |reason: String| UnpackError::InvalidEntry {
            layer: self.layer.clone(),
            entry: shown.clone(),
            reason,
        };
        let entry_type = entry.header().entry_type();
        if entry_type.is_pax_global_extensions() {
            return Ok(());
        }
        let path = name::clean_name(&raw).map_err(|r| invalid(r.to_string()))?;
        let result = match name::classify(&path).map_err(|r| invalid(r.to_string()))? {
            Special::AufsMeta => return Ok(()),
            Special::Opaque { dir } => {
                let dir = dir.to_path_buf();
                self.opaque(&dir)
            }
            Special::Whiteout { target } => self.insert(
                &target,
                Inode::new(Kind::CharDevice { major: 0, minor: 0 }, 0),
            ),
            Special::None => self.file(&path, entry),
        };
        match result {
            Ok(()) => {
                self.entries += 1;
                Ok(())
            }
            Err(OpError::Invalid(reason)) => Err(invalid(reason)),
            Err(OpError::Stream(e)) => Err(UnpackError::Stream {
                layer: self.layer.clone(),
                offset: 0,
                source: e,
            }),
            Err(OpError::Root(source)) => Err(UnpackError::Apply {
                layer: self.layer.clone(),
                entry: shown,
                source: Box::new(source),
            }),
        }
    }

    fn file<R: Read>(&mut self, path: &Path, entry: &mut tar::Entry<'_, R>) -> Result<(), OpError> {
        let meta = read_meta(entry)?;
        let link_target = || entry.link_name_bytes().map(|t| t.into_owned());
        use tar::EntryType as T;
        let kind = match entry.header().entry_type() {
            T::Directory => {
                return self.directory(path, &meta);
            }
            T::Regular | T::Continuous => Kind::Regular {
                offset: erofs::TAR_OFFSET + entry.raw_file_position(),
                size: entry.size(),
            },
            T::GNUSparse => {
                return Err(OpError::Invalid(
                    "a sparse file, which a layer image cannot index".into(),
                ))
            }
            T::Symlink => Kind::Symlink(link_target().unwrap_or_default()),
            T::Link => {
                let target = link_target().unwrap_or_default();
                return self.hard_link(path, &target);
            }
            T::Char => {
                if meta.device == (0, 0) {
                    return Err(OpError::Invalid(
                        "a 0:0 character device reads as a whiteout in an overlay lower dir".into(),
                    ));
                }
                Kind::CharDevice {
                    major: meta.device.0,
                    minor: meta.device.1,
                }
            }
            T::Block => Kind::BlockDevice {
                major: meta.device.0,
                minor: meta.device.1,
            },
            T::Fifo => Kind::Fifo,
            other => {
                return Err(OpError::Invalid(format!(
                    "unsupported tar entry type {:?}",
                    other.as_byte() as char
                )))
            }
        };
        if path.as_os_str().is_empty() {
            return Err(OpError::Invalid(
                "only a directory may stand for the root".into(),
            ));
        }
        let mut inode = Inode::new(kind, meta.mode);
        apply_meta(&mut inode, &meta)?;
        self.insert(path, inode)
    }

    fn directory(&mut self, path: &Path, meta: &EntryMeta) -> Result<(), OpError> {
        let existing = if path.as_os_str().is_empty() {
            Some(0)
        } else {
            let parent = self.dir_index(path.parent().unwrap_or(Path::new("")))?;
            let name = path.file_name().expect("not the root").as_bytes();
            self.entries_of(parent)
                .get(name)
                .copied()
                .filter(|&i| matches!(self.tree.inodes[i].kind, Kind::Directory(_)))
        };
        match existing {
            Some(index) => {
                let inode = &mut self.tree.inodes[index];
                let opaque = inode
                    .xattrs
                    .iter()
                    .find(|(name, _)| name == OPAQUE_XATTR)
                    .cloned();
                inode.permissions = meta.mode;
                apply_meta(inode, meta)?;
                if let Some(opaque) = opaque {
                    inode.xattrs.push(opaque);
                }
                Ok(())
            }
            None => {
                let mut inode = Inode::new(Kind::Directory(BTreeMap::new()), meta.mode);
                apply_meta(&mut inode, meta)?;
                self.insert(path, inode)
            }
        }
    }

    fn hard_link(&mut self, path: &Path, target: &[u8]) -> Result<(), OpError> {
        let target_path = name::clean_name(target).map_err(|r| OpError::Invalid(r.into()))?;
        let found = target_path
            .parent()
            .and_then(|dir| self.dir_index(dir).ok())
            .and_then(|dir| {
                let name = target_path.file_name()?.as_bytes();
                self.entries_of(dir).get(name).copied()
            });
        match found {
            Some(index) if !matches!(self.tree.inodes[index].kind, Kind::Directory(_)) => {
                let parent = self.parent_index(path)?;
                let name = path.file_name().expect("not the root").as_bytes().to_vec();
                self.entries_of_mut(parent).insert(name, index);
                Ok(())
            }
            Some(_) => Err(OpError::Invalid("a hard link to a directory".into())),
            None => Err(OpError::Invalid(format!(
                "a hard link to {:?}, which is not in the layer, which therefore cannot be unpacked on its own",
                target_path
            ))),
        }
    }

    fn opaque(&mut self, dir: &Path) -> Result<(), OpError> {
        let index = self.dir_index(dir)?;
        let inode = &mut self.tree.inodes[index];
        if !inode.xattrs.iter().any(|(name, _)| name == OPAQUE_XATTR) {
            inode.xattrs.push((OPAQUE_XATTR.to_vec(), b"y".to_vec()));
        }
        Ok(())
    }

    /// Puts `inode` at `path`, replacing what the layer had there (a directory with its
    /// contents).
    fn insert(&mut self, path: &Path, inode: Inode) -> Result<(), OpError> {
        let parent = self.parent_index(path)?;
        let name = path
            .file_name()
            .ok_or_else(|| OpError::Invalid("no name".into()))?
            .as_bytes()
            .to_vec();
        let index = self.tree.inodes.len();
        if index >= MAX_INODES {
            return Err(OpError::Invalid(format!(
                "more than {MAX_INODES} entries, too many to index in memory"
            )));
        }
        self.tree.inodes.push(inode);
        self.entries_of_mut(parent).insert(name, index);
        Ok(())
    }

    fn parent_index(&self, path: &Path) -> Result<usize, OpError> {
        self.dir_index(path.parent().unwrap_or(Path::new("")))
    }

    /// The directory at `dir`, which this layer must list, reached through directories only.
    fn dir_index(&self, dir: &Path) -> Result<usize, OpError> {
        let mut index = 0;
        for component in dir.components() {
            let Component::Normal(name) = component else {
                continue;
            };
            let Some(&next) = self.entries_of(index).get(name.as_bytes()) else {
                return Err(OpError::Invalid(format!(
                    "its directory {dir:?} is not in the layer, which therefore cannot be unpacked on its own"
                )));
            };
            if !matches!(self.tree.inodes[next].kind, Kind::Directory(_)) {
                return Err(OpError::Invalid(format!(
                    "{:?} on its path is not a directory in the layer",
                    OsStr::from_bytes(name.as_bytes())
                )));
            }
            index = next;
        }
        Ok(index)
    }

    fn entries_of(&self, index: usize) -> &BTreeMap<Vec<u8>, usize> {
        match &self.tree.inodes[index].kind {
            Kind::Directory(entries) => entries,
            _ => unreachable!("dir_index only returns directories"),
        }
    }

    fn entries_of_mut(&mut self, index: usize) -> &mut BTreeMap<Vec<u8>, usize> {
        match &mut self.tree.inodes[index].kind {
            Kind::Directory(entries) => entries,
            _ => unreachable!("dir_index only returns directories"),
        }
    }
}

/// Owner, time and xattrs of an entry onto its inode (overlayfs's own xattrs refused, as in an
/// unpacked tree).
fn apply_meta(inode: &mut Inode, meta: &EntryMeta) -> Result<(), OpError> {
    inode.uid = meta.uid;
    inode.gid = meta.gid;
    inode.mtime = meta.times.last_modification.tv_sec;
    inode.mtime_nsec = meta.times.last_modification.tv_nsec as u32;
    inode.xattrs.clear();
    for (name, value) in &meta.xattrs {
        let name = name.as_bytes();
        if name.starts_with(b"trusted.overlay.") {
            return Err(OpError::Invalid(format!(
                "xattr {} is overlayfs's own, so the layer cannot be an overlay lower dir",
                String::from_utf8_lossy(name)
            )));
        }
        inode.xattrs.push((name.to_vec(), value.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Compression;
    use super::*;

    #[test]
    fn compression_is_kept_in_the_report() {
        // Exercised end to end (with mounts) in tests/layer_images.rs; here only that a plain
        // tar is accepted without the kernel.
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        tar.append_data(&mut header, "etc/", io::empty()).unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(5);
        tar.append_data(&mut header, "etc/hostname", &b"kiln\n"[..])
            .unwrap();
        let bytes = tar.into_inner().unwrap();
        let digest = Digest::sha256_of(&bytes);
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("layer.img");
        let report = unpack_layer_image(&image, &bytes[..], &digest, Some(&digest)).unwrap();
        assert_eq!(report.compression, Compression::None);
        assert_eq!(report.entries, 2);
        let written = std::fs::read(&image).unwrap();
        // The tar sits in the image byte for byte.
        let start = erofs::TAR_OFFSET as usize;
        assert_eq!(&written[start..start + bytes.len()], &bytes[..]);
        assert_eq!(&written[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
    }
}

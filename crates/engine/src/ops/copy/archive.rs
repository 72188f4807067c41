//! ADD's auto-extraction of local archives: a source file whose content is a tar stream, plain
//! or compressed with gzip, bzip2, xz or zstd, is unpacked into the destination directory
//! instead of being copied. Like Docker, the format is recognised from the content (magic
//! bytes, then a valid tar header after decompression), never from the file name; anything else
//! is an ordinary file.
//!
//! Entries are applied with [`kiln_fs::unpack`] through a [`Root`] opened at the destination
//! directory, so a hostile archive (`..` names, absolute symlinks followed by writes through
//! them, hard links out of the tree) cannot write outside that directory: it is treated as `/`
//! for every entry, as Docker's chrooted untar does. Entries keep the archive's owners, modes
//! and times unless `--chown` is given, which then owns every extracted entry.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_fs::resolve::Root;
use kiln_fs::unpack::{unpack_layer, UnpackEvent, UnpackOptions};
use kiln_oci::{Algorithm, Digest, Hasher};

/// How an archive's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArchiveFormat {
    /// A plain tar.
    Tar,
    /// gzip.
    Gzip,
    /// bzip2.
    Bzip2,
    /// xz.
    Xz,
    /// Zstandard.
    Zstd,
}

impl ArchiveFormat {
    fn from_magic(magic: &[u8]) -> ArchiveFormat {
        if magic.starts_with(&[0x1f, 0x8b]) {
            ArchiveFormat::Gzip
        } else if magic.starts_with(b"BZh") {
            ArchiveFormat::Bzip2
        } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            ArchiveFormat::Xz
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            ArchiveFormat::Zstd
        } else {
            ArchiveFormat::Tar
        }
    }

    /// The decompressed stream of `input`.
    fn decoder<'a>(self, input: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            ArchiveFormat::Tar => Box::new(input),
            ArchiveFormat::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
            ArchiveFormat::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(input)),
            ArchiveFormat::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(input)),
            ArchiveFormat::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
        })
    }

    /// Whether kiln-fs's layer reader decompresses this format itself.
    fn read_by_unpack(self) -> bool {
        matches!(
            self,
            ArchiveFormat::Tar | ArchiveFormat::Gzip | ArchiveFormat::Zstd
        )
    }
}

/// Whether a 512-byte block is a tar header: its checksum field parses and matches the sum of
/// the block's bytes with that field counted as spaces (what a tar reader checks first).
fn is_tar_header(block: &[u8; 512]) -> bool {
    let field = &block[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    if digits.is_empty() {
        return false;
    }
    let Some(recorded) = std::str::from_utf8(&digits)
        .ok()
        .and_then(|d| u64::from_str_radix(d, 8).ok())
    else {
        return false;
    };
    // Some old writers summed signed bytes: both sums are accepted.
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, byte) in block.iter().enumerate() {
        let (u, v) = if (148..156).contains(&i) {
            (32, 32)
        } else {
            (u64::from(*byte), i64::from(*byte as i8))
        };
        unsigned += u;
        signed += v;
    }
    recorded == unsigned || i64::try_from(recorded).is_ok_and(|r| r == signed)
}

/// Recognises an archive ADD extracts: the file's decompressed content must start with a
/// valid tar header. A file that does not decompress, or decompresses to something else, is
/// not an archive (Docker then copies it as it is).
pub(crate) fn detect(source: &Root, rel: &Path) -> Result<Option<ArchiveFormat>, String> {
    let mut file = source
        .open_file(rel)
        .map_err(|e| format!("{}: {e}", rel.display()))?;
    sniff(&mut file).map_err(|e| format!("{}: {e}", rel.display()))
}

fn sniff(file: &mut File) -> io::Result<Option<ArchiveFormat>> {
    let mut magic = Vec::with_capacity(6);
    (&mut *file).take(6).read_to_end(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    let format = ArchiveFormat::from_magic(&magic);
    let Ok(mut decoded) = format.decoder(&mut *file) else {
        return Ok(None);
    };
    let mut block = [0u8; 512];
    match decoded.read_exact(&mut block) {
        Ok(()) if is_tar_header(&block) => Ok(Some(format)),
        _ => Ok(None),
    }
}

/// One path an extraction changed, relative to the destination directory (empty for the
/// directory itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extracted {
    /// The path.
    pub path: PathBuf,
    /// Whether it was removed (an entry replaced it with another type) rather than written.
    pub removed: bool,
}

/// Extracts the archive `archive` of the tree `source` (of `format`, see [`detect`]) into
/// `dest`, a directory that acts as `/` for every entry. With `owner`, every extracted entry is
/// owned by it instead of the ids in the archive. Returns the paths written or removed.
pub(crate) fn extract(
    dest: &Root,
    source: &Root,
    archive: &Path,
    format: ArchiveFormat,
    owner: Option<(u32, u32)>,
) -> Result<Vec<Extracted>, String> {
    let shown = archive.display();
    let open = || {
        source
            .open_file(archive)
            .map_err(|e| format!("{shown}: {e}"))
    };
    // kiln-fs verifies what it reads against a digest given up front: the file itself for the
    // formats it decompresses, else the decompressed tar, hashed in a first pass.
    let digest_of = |reader: &mut dyn Read| -> Result<Digest, String> {
        let mut hasher = Hasher::new(Algorithm::Sha256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("{shown}: reading the archive: {e}")),
            }
        }
        Ok(hasher.finish())
    };
    let decoded = |file: File| {
        format
            .decoder(file)
            .map_err(|e| format!("{shown}: decompressing the archive: {e}"))
    };
    let (digest, stream): (Digest, Box<dyn Read>) = if format.read_by_unpack() {
        let digest = digest_of(&mut open()?)?;
        (digest, Box::new(open()?))
    } else {
        let digest = digest_of(&mut decoded(open()?)?)?;
        (digest, decoded(open()?)?)
    };

    let mut changed: Vec<Extracted> = Vec::new();
    let mut modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut on_event = |event: UnpackEvent<'_>| match event {
        UnpackEvent::Written { path, metadata } => {
            if !metadata.file_type().is_symlink() {
                modes.push((path.to_path_buf(), metadata.mode() & 0o7777));
            }
            changed.push(Extracted {
                path: path.to_path_buf(),
                removed: false,
            });
        }
        UnpackEvent::Removed { path } => changed.push(Extracted {
            path: path.to_path_buf(),
            removed: true,
        }),
    };
    unpack_layer(
        dest,
        stream,
        &digest,
        UnpackOptions {
            diff_id: None,
            on_event: Some(&mut on_event),
        },
    )
    .map_err(|e| format!("{shown}: extracting the archive: {e}"))?;

    if let Some((uid, gid)) = owner {
        let modes: std::collections::HashMap<_, _> = modes.into_iter().collect();
        for entry in changed.iter().filter(|c| !c.removed) {
            // The destination directory itself keeps its owner: it may be a directory of the
            // image (`/tmp`) that the archive only adds to.
            if entry.path.as_os_str().is_empty() {
                continue;
            }
            chown(dest, &entry.path, uid, gid, modes.get(&entry.path).copied())?;
        }
    }
    Ok(changed)
}

/// Sets the owner of `rel` (not following a final symlink), then puts back `mode`, whose
/// setuid/setgid bits the kernel clears on chown.
fn chown(root: &Root, rel: &Path, uid: u32, gid: u32, mode: Option<u32>) -> Result<(), String> {
    match root.set_owner(rel, uid, gid) {
        Ok(()) => {}
        // Replaced later in the same archive.
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.to_string()),
    }
    if let Some(mode) = mode.filter(|m| m & 0o6000 != 0) {
        root.set_mode(rel, mode).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    /// A tar with a directory, a file owned by 1000:1000 with mode 0750 and a symlink.
    fn sample_tar() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_path("pkg/").unwrap();
        dir.set_mode(0o755);
        dir.set_size(0);
        dir.set_cksum();
        builder.append(&dir, io::empty()).unwrap();
        let mut file = tar::Header::new_gnu();
        file.set_path("pkg/tool").unwrap();
        file.set_mode(0o750);
        file.set_uid(1000);
        file.set_gid(1000);
        file.set_size(5);
        file.set_cksum();
        builder.append(&file, &b"tool\n"[..]).unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_path("pkg/latest").unwrap();
        link.set_link_name("tool").unwrap();
        link.set_size(0);
        link.set_cksum();
        builder.append(&link, io::empty()).unwrap();
        builder.into_inner().unwrap()
    }

    fn compress(format: ArchiveFormat, data: &[u8]) -> Vec<u8> {
        match format {
            ArchiveFormat::Tar => data.to_vec(),
            ArchiveFormat::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            ArchiveFormat::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            ArchiveFormat::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            ArchiveFormat::Zstd => zstd::encode_all(data, 3).unwrap(),
        }
    }

    #[test]
    fn every_format_is_detected_by_content_and_extracted_with_archive_owners() {
        for format in [
            ArchiveFormat::Tar,
            ArchiveFormat::Gzip,
            ArchiveFormat::Bzip2,
            ArchiveFormat::Xz,
            ArchiveFormat::Zstd,
        ] {
            let dir = tempfile::tempdir().unwrap();
            // A misleading name: detection looks at the bytes only.
            let path = dir.path().join("archive.txt");
            std::fs::write(&path, compress(format, &sample_tar())).unwrap();
            let source = Root::open(dir.path()).unwrap();
            let name = Path::new("archive.txt");
            assert_eq!(detect(&source, name).unwrap(), Some(format), "{format:?}");

            let dest = tempfile::tempdir().unwrap();
            std::fs::write(dest.path().join("kept"), "k").unwrap();
            let root = Root::open(dest.path()).unwrap();
            let changed = extract(&root, &source, name, format, None).unwrap();
            assert!(changed.iter().any(|c| c.path == Path::new("pkg/tool")));
            let tool = dest.path().join("pkg/tool");
            assert_eq!(std::fs::read_to_string(&tool).unwrap(), "tool\n");
            let meta = std::fs::metadata(&tool).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (1000, 1000), "{format:?}");
            assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
            assert_eq!(
                std::fs::read_link(dest.path().join("pkg/latest")).unwrap(),
                Path::new("tool")
            );
            assert!(dest.path().join("kept").exists(), "extraction merges");
        }
    }

    #[test]
    fn chown_owns_every_extracted_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tgz");
        std::fs::write(&path, compress(ArchiveFormat::Gzip, &sample_tar())).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let root = Root::open(dest.path()).unwrap();
        let source = Root::open(dir.path()).unwrap();
        extract(
            &root,
            &source,
            Path::new("a.tgz"),
            ArchiveFormat::Gzip,
            Some((7, 8)),
        )
        .unwrap();
        for rel in ["pkg", "pkg/tool", "pkg/latest"] {
            let meta = std::fs::symlink_metadata(dest.path().join(rel)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (7, 8), "{rel}");
        }
    }

    #[test]
    fn non_archives_are_not_detected() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let detected = |name: &str| detect(&root, Path::new(name)).unwrap();
        std::fs::write(
            dir.path().join("notes.tar.gz"),
            "just text, named like an archive\n",
        )
        .unwrap();
        assert_eq!(detected("notes.tar.gz"), None);
        std::fs::write(
            dir.path().join("text.gz"),
            compress(ArchiveFormat::Gzip, &[b'x'; 2000]),
        )
        .unwrap();
        assert_eq!(detected("text.gz"), None, "gzip of a non-tar");
        std::fs::write(dir.path().join("empty"), "").unwrap();
        assert_eq!(detected("empty"), None);
    }

    #[test]
    fn hostile_archives_cannot_write_outside_the_destination() {
        use kiln_testkit::hostile::raw_tar_entry;
        let outside = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let dest_path = rootfs.path().join("dest");
        std::fs::create_dir(&dest_path).unwrap();
        std::fs::create_dir(rootfs.path().join("etc")).unwrap();
        let outside_str = outside.path().to_str().unwrap().as_bytes().to_vec();

        // Absolute symlinks, then writes through them: they land inside the destination.
        let mut through_links = Vec::new();
        raw_tar_entry(
            &mut through_links,
            b"sys",
            tar::EntryType::Symlink,
            b"/etc",
            b"",
        );
        raw_tar_entry(
            &mut through_links,
            b"sys/evil",
            tar::EntryType::Regular,
            b"",
            b"x",
        );
        raw_tar_entry(
            &mut through_links,
            b"out",
            tar::EntryType::Symlink,
            &outside_str,
            b"",
        );
        raw_tar_entry(
            &mut through_links,
            b"out/evil",
            tar::EntryType::Regular,
            b"",
            b"x",
        );
        raw_tar_entry(
            &mut through_links,
            b"up",
            tar::EntryType::Symlink,
            b"../../..",
            b"",
        );
        raw_tar_entry(
            &mut through_links,
            b"up/evil",
            tar::EntryType::Regular,
            b"",
            b"x",
        );
        through_links.extend_from_slice(&[0u8; 1024]);
        let archive_dir = tempfile::tempdir().unwrap();
        let archive = archive_dir.path().join("links.tar");
        std::fs::write(&archive, &through_links).unwrap();
        let source = Root::open(archive_dir.path()).unwrap();
        let name = Path::new("links.tar");
        assert_eq!(detect(&source, name).unwrap(), Some(ArchiveFormat::Tar));
        let dest = Root::open(&dest_path).unwrap();
        extract(&dest, &source, name, ArchiveFormat::Tar, None).unwrap();
        assert!(dest_path.join("etc/evil").is_file(), "contained in dest");
        assert!(!rootfs.path().join("etc/evil").exists());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(!rootfs.path().join("evil").exists());
        assert!(
            dest_path.join("evil").is_file(),
            "`..` clamps at the destination"
        );

        // `..` names and hard links out of the tree are refused.
        for (name, kind, link) in [
            (&b"../escape"[..], tar::EntryType::Regular, &b""[..]),
            (b"a/../../escape", tar::EntryType::Regular, b""),
            (b"hl", tar::EntryType::Link, b"../../etc/passwd"),
        ] {
            let mut bytes = Vec::new();
            raw_tar_entry(&mut bytes, name, kind, link, b"x");
            bytes.extend_from_slice(&[0u8; 1024]);
            std::fs::write(&archive, &bytes).unwrap();
            let err = extract(
                &dest,
                &source,
                Path::new("links.tar"),
                ArchiveFormat::Tar,
                None,
            )
            .unwrap_err();
            assert!(err.contains("links.tar"), "{err}");
            assert!(!rootfs.path().join("escape").exists());
            assert!(!archive_dir.path().join("escape").exists());
        }
    }
}

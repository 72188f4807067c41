//! Read-only EROFS images that index a layer's uncompressed tar instead of copying its files
//! out, and their mounts.
//!
//! Creating an inode costs half a millisecond on the disks builds run on, and a Debian base is
//! thousands of them. An image made here is one file: the layer's tar as it streamed in, then
//! the directories, symlink targets and inodes EROFS needs to serve it as a filesystem. A
//! regular file's inode points at its bytes inside the tar (tar data is 512-byte aligned, so the
//! image uses 512-byte blocks and needs no copy), which makes building the image cost one
//! sequential write of the tar plus a little metadata, however many files the layer holds.
//! Mounted read-only (a file-backed EROFS mount, Linux 6.12 and later), it serves as an
//! overlayfs lower dir like an unpacked tree would.
//!
//! The layout, in 512-byte blocks:
//!
//! - blocks 0-7: zeros, with the superblock at byte 1024;
//! - from byte [`TAR_OFFSET`]: the tar, byte for byte;
//! - then the directory blocks and symlink targets;
//! - then the inodes (extended, 64 bytes, each followed by its inline xattrs and never
//!   crossing a block boundary), the metadata area the superblock points at.
//!
//! Only the plain parts of the format are written: no compression, no shared xattrs, no
//! chunk indexes, no superblock checksum. The format is described in the kernel's
//! `Documentation/filesystems/erofs.rst` and `fs/erofs/erofs_fs.h`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

/// log2 of the block size: 512 bytes, the alignment of data in a tar.
const BLOCK_BITS: u8 = 9;
/// The block size.
pub const BLOCK_SIZE: u64 = 1 << BLOCK_BITS;
/// Where the tar starts in an image: past the superblock, on a page boundary.
pub const TAR_OFFSET: u64 = 4096;

const SUPER_OFFSET: u64 = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
const INODE_SIZE: usize = 64;
/// Inodes are addressed in 32-byte slots from the start of the metadata area.
const SLOT: u64 = 32;
/// The first slots are left empty so no inode has number 0, which some programs read as "no
/// entry".
const FIRST_SLOT: u64 = 2;
const DIRENT_SIZE: usize = 12;
const XATTR_HEADER_SIZE: usize = 12;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;

/// What an inode is, with what the image needs to serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory and its entries, by name, as indexes into [`Tree::inodes`]. `.` and `..`
    /// are added when writing.
    Directory(BTreeMap<Vec<u8>, usize>),
    /// A regular file whose bytes are `size` bytes at `offset` in the image (inside the tar,
    /// so `offset` is a multiple of [`BLOCK_SIZE`]).
    Regular {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        size: u64,
    },
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A character device (a 0:0 one is an overlayfs whiteout).
    CharDevice {
        /// Major device number.
        major: u32,
        /// Minor device number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major device number.
        major: u32,
        /// Minor device number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One inode of a [`Tree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// What it is.
    pub kind: Kind,
    /// Permission bits, setuid, setgid and sticky included (`0o7777`).
    pub permissions: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes, full names (`user.x`, `trusted.overlay.opaque`, ...).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Inode {
    /// An inode of `kind` owned by root, mode `permissions`, dated the epoch, without xattrs.
    pub fn new(kind: Kind, permissions: u32) -> Inode {
        Inode {
            kind,
            permissions,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }

    fn file_type(&self) -> (u32, u8) {
        match self.kind {
            Kind::Directory(_) => (S_IFDIR, 2),
            Kind::Regular { .. } => (S_IFREG, 1),
            Kind::Symlink(_) => (S_IFLNK, 7),
            Kind::CharDevice { .. } => (S_IFCHR, 3),
            Kind::BlockDevice { .. } => (S_IFBLK, 4),
            Kind::Fifo => (S_IFIFO, 5),
        }
    }
}

/// A file tree to describe in an image; inode 0 is the root directory. Inodes no directory
/// reaches are left out of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// Every inode; an index into this is how directories name their entries (two entries
    /// naming one index are hard links).
    pub inodes: Vec<Inode>,
}

/// Why a tree cannot be written as an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The tree uses something this writer does not put in an image.
    #[error("{0}")]
    Unsupported(String),
    /// Writing the image failed.
    #[error("writing {}: {source}", path.display())]
    Io {
        /// The image file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Where each reachable inode goes.
struct Placed {
    /// Reachable inodes, root first, each once.
    order: Vec<usize>,
    /// Per inode index: its slot number (nid) in the metadata area, if reachable.
    nid: Vec<Option<u64>>,
    /// Per inode index: link count.
    nlink: Vec<u32>,
    /// Per inode index: the directory holding it (the root holds itself).
    parent: Vec<usize>,
    /// Bytes of the metadata area.
    meta_len: u64,
}

/// Writes the metadata of `tree` into the image `file` (at `path`, for errors) after its first
/// `data_end` bytes (the tar, from [`TAR_OFFSET`]), and the superblock. Returns the image's
/// size.
pub fn write_metadata(
    file: &File,
    path: &Path,
    tree: &Tree,
    data_end: u64,
) -> Result<u64, ImageError> {
    if !matches!(
        tree.inodes.first().map(|i| &i.kind),
        Some(Kind::Directory(_))
    ) {
        return Err(ImageError::Unsupported(
            "the root of an image must be a directory".into(),
        ));
    }
    let xattr_blobs = tree
        .inodes
        .iter()
        .map(|inode| xattr_body(&inode.xattrs))
        .collect::<Result<Vec<_>, _>>()?;
    let placed = place(tree, &xattr_blobs)?;
    let io_err = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };

    // Directory blocks and symlink targets, right after the tar.
    let data_start = round_up(data_end.max(TAR_OFFSET), BLOCK_SIZE);
    let mut data: Vec<u8> = Vec::new();
    let mut start_block: Vec<u64> = vec![0; tree.inodes.len()];
    let mut sizes: Vec<u64> = vec![0; tree.inodes.len()];
    for &index in &placed.order {
        let inode = &tree.inodes[index];
        match &inode.kind {
            Kind::Directory(entries) => {
                let own = placed.nid[index].expect("placed");
                let up = placed.nid[placed.parent[index]].expect("placed");
                let mut all: Vec<(&[u8], u64, u8)> = Vec::with_capacity(entries.len() + 2);
                all.push((b".", own, 2));
                all.push((b"..", up, 2));
                for (name, &child) in entries {
                    let nid = placed.nid[child].expect("reachable");
                    all.push((name, nid, tree.inodes[child].file_type().1));
                }
                all.sort_by(|a, b| a.0.cmp(b.0));
                start_block[index] = (data_start + data.len() as u64) / BLOCK_SIZE;
                let before = data.len();
                dir_blocks(&all, &mut data)?;
                sizes[index] = (data.len() - before) as u64;
            }
            Kind::Symlink(target) => {
                start_block[index] = (data_start + data.len() as u64) / BLOCK_SIZE;
                data.extend_from_slice(target);
                data.resize(round_up(data.len() as u64, BLOCK_SIZE) as usize, 0);
                sizes[index] = target.len() as u64;
            }
            Kind::Regular { offset, size } => {
                if offset % BLOCK_SIZE != 0 {
                    return Err(ImageError::Unsupported(format!(
                        "file data at offset {offset}, not on a {BLOCK_SIZE}-byte boundary"
                    )));
                }
                start_block[index] = if *size == 0 { 0 } else { offset / BLOCK_SIZE };
                sizes[index] = *size;
            }
            _ => {}
        }
    }
    file.write_all_at(&data, data_start).map_err(io_err)?;

    let meta_start = data_start + data.len() as u64;
    let mut meta = vec![0u8; placed.meta_len as usize];
    for &index in &placed.order {
        let inode = &tree.inodes[index];
        let at = (placed.nid[index].expect("placed") * SLOT) as usize;
        let xattrs = &xattr_blobs[index];
        let (file_type, _) = inode.file_type();
        let raw_u = match inode.kind {
            Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
                encode_dev(major, minor)
            }
            Kind::Fifo => 0,
            _ => u32::try_from(start_block[index]).map_err(|_| {
                ImageError::Unsupported("a layer too large for 32-bit block numbers".into())
            })?,
        };
        let slot = &mut meta[at..at + INODE_SIZE];
        // i_format: extended inode, flat plain layout.
        slot[0..2].copy_from_slice(&1u16.to_le_bytes());
        let icount = if xattrs.is_empty() {
            0
        } else {
            (xattrs.len() - XATTR_HEADER_SIZE) / 4 + 1
        };
        slot[2..4].copy_from_slice(&(icount as u16).to_le_bytes());
        let mode = file_type | (inode.permissions & 0o7777);
        slot[4..6].copy_from_slice(&(mode as u16).to_le_bytes());
        slot[8..16].copy_from_slice(&sizes[index].to_le_bytes());
        slot[16..20].copy_from_slice(&raw_u.to_le_bytes());
        slot[20..24].copy_from_slice(&(index as u32 + 1).to_le_bytes());
        slot[24..28].copy_from_slice(&inode.uid.to_le_bytes());
        slot[28..32].copy_from_slice(&inode.gid.to_le_bytes());
        slot[32..40].copy_from_slice(&(inode.mtime.max(0) as u64).to_le_bytes());
        slot[40..44].copy_from_slice(&inode.mtime_nsec.to_le_bytes());
        slot[44..48].copy_from_slice(&placed.nlink[index].to_le_bytes());
        meta[at + INODE_SIZE..at + INODE_SIZE + xattrs.len()].copy_from_slice(xattrs);
    }
    file.write_all_at(&meta, meta_start).map_err(io_err)?;
    let end = meta_start + meta.len() as u64;

    let mut superblock = [0u8; 128];
    superblock[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    superblock[12] = BLOCK_BITS;
    let root_nid = placed.nid[0].expect("root placed");
    superblock[14..16].copy_from_slice(&(root_nid as u16).to_le_bytes());
    superblock[16..24].copy_from_slice(&(placed.order.len() as u64).to_le_bytes());
    let blocks = u32::try_from(end / BLOCK_SIZE)
        .map_err(|_| ImageError::Unsupported("image too large".into()))?;
    superblock[36..40].copy_from_slice(&blocks.to_le_bytes());
    let meta_block = u32::try_from(meta_start / BLOCK_SIZE)
        .map_err(|_| ImageError::Unsupported("image too large".into()))?;
    superblock[40..44].copy_from_slice(&meta_block.to_le_bytes());
    file.write_all_at(&superblock, SUPER_OFFSET)
        .map_err(io_err)?;
    if data_end < TAR_OFFSET {
        // No tar (a tree without file data): the blocks before it must still exist.
        file.set_len(end.max(TAR_OFFSET)).map_err(io_err)?;
    }
    Ok(end)
}

/// Orders the reachable inodes breadth first from the root, counts their links, and gives each
/// a slot in the metadata area (inode and xattrs kept inside one block).
fn place(tree: &Tree, xattr_blobs: &[Vec<u8>]) -> Result<Placed, ImageError> {
    let count = tree.inodes.len();
    let mut nid = vec![None; count];
    let mut nlink = vec![0u32; count];
    let mut parent = vec![0usize; count];
    let mut order = Vec::new();
    let mut seen = vec![false; count];
    let mut queue = std::collections::VecDeque::from([0usize]);
    seen[0] = true;
    while let Some(index) = queue.pop_front() {
        order.push(index);
        if let Kind::Directory(entries) = &tree.inodes[index].kind {
            nlink[index] += 2;
            for &child in entries.values() {
                let child_inode = tree.inodes.get(child).ok_or_else(|| {
                    ImageError::Unsupported(format!("entry names missing inode {child}"))
                })?;
                if matches!(child_inode.kind, Kind::Directory(_)) {
                    if seen[child] {
                        return Err(ImageError::Unsupported("a directory linked twice".into()));
                    }
                    nlink[index] += 1;
                    parent[child] = index;
                } else {
                    nlink[child] += 1;
                }
                if !seen[child] {
                    seen[child] = true;
                    queue.push_back(child);
                }
            }
        }
    }
    let mut offset = FIRST_SLOT * SLOT;
    for &index in &order {
        let size = (INODE_SIZE + xattr_blobs[index].len()) as u64;
        if size > BLOCK_SIZE {
            return Err(ImageError::Unsupported(
                "xattrs too large for an inode's block".into(),
            ));
        }
        if offset % BLOCK_SIZE + size > BLOCK_SIZE {
            offset = round_up(offset, BLOCK_SIZE);
        }
        nid[index] = Some(offset / SLOT);
        offset = round_up(offset + size, SLOT);
    }
    if nid[0].is_some_and(|n| n > u64::from(u16::MAX)) {
        return Err(ImageError::Unsupported("root inode out of reach".into()));
    }
    Ok(Placed {
        order,
        nid,
        nlink,
        parent,
        meta_len: round_up(offset, BLOCK_SIZE),
    })
}

/// Appends `entries` (sorted by name) to `out` as directory blocks: each block starts with its
/// dirents, whose name offsets point at the names packed after them.
fn dir_blocks(entries: &[(&[u8], u64, u8)], out: &mut Vec<u8>) -> Result<(), ImageError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let mut count = 0;
        let mut used = 0;
        while count < rest.len() {
            let name_len = rest[count].0.len();
            if name_len == 0 || name_len > 255 {
                return Err(ImageError::Unsupported(format!(
                    "a name of {name_len} bytes"
                )));
            }
            if used + DIRENT_SIZE + name_len > BLOCK_SIZE as usize {
                break;
            }
            used += DIRENT_SIZE + name_len;
            count += 1;
        }
        let block_start = out.len();
        out.resize(block_start + BLOCK_SIZE as usize, 0);
        let block = &mut out[block_start..];
        let mut name_at = count * DIRENT_SIZE;
        for (i, (name, nid, file_type)) in rest[..count].iter().enumerate() {
            let dirent = &mut block[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE];
            dirent[0..8].copy_from_slice(&nid.to_le_bytes());
            dirent[8..10].copy_from_slice(&(name_at as u16).to_le_bytes());
            dirent[10] = *file_type;
            block[name_at..name_at + name.len()].copy_from_slice(name);
            name_at += name.len();
        }
        rest = &rest[count..];
    }
    Ok(())
}

/// The inline xattr body of an inode: a header, then one entry per xattr (name index, the
/// name after its prefix, the value), each padded to 4 bytes. Empty without xattrs.
fn xattr_body(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>, ImageError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut body = vec![0u8; XATTR_HEADER_SIZE];
    for (name, value) in xattrs {
        let (index, suffix) = xattr_index(name).ok_or_else(|| {
            ImageError::Unsupported(format!(
                "xattr {} has a namespace EROFS images do not hold",
                String::from_utf8_lossy(name)
            ))
        })?;
        let (Ok(name_len), Ok(value_len)) =
            (u8::try_from(suffix.len()), u16::try_from(value.len()))
        else {
            return Err(ImageError::Unsupported(format!(
                "xattr {} too long",
                String::from_utf8_lossy(name)
            )));
        };
        body.push(name_len);
        body.push(index);
        body.extend_from_slice(&value_len.to_le_bytes());
        body.extend_from_slice(suffix);
        body.extend_from_slice(value);
        body.resize(round_up(body.len() as u64, 4) as usize, 0);
    }
    Ok(body)
}

/// EROFS's short prefix index for an xattr name, and the rest of the name.
fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((2, b"")),
        b"system.posix_acl_default" => return Some((3, b"")),
        _ => {}
    }
    for (prefix, index) in [(&b"user."[..], 1u8), (b"trusted.", 4), (b"security.", 6)] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return (!rest.is_empty()).then_some((index, rest));
        }
    }
    None
}

/// The kernel's `new_encode_dev`.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

/// A read-only mount of an image, unmounted (lazily, so a process still inside does not keep
/// it) when dropped.
#[derive(Debug)]
pub struct ErofsMount {
    target: PathBuf,
}

impl ErofsMount {
    /// Mounts the image file `image` read-only at `target` (an existing directory).
    pub fn mount(image: &Path, target: &Path) -> io::Result<ErofsMount> {
        rustix::mount::mount(image, target, "erofs", MountFlags::RDONLY, None)?;
        Ok(ErofsMount {
            target: target.to_path_buf(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for ErofsMount {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.target, UnmountFlags::DETACH) {
            tracing::warn!(
                "unmounting the layer image at {}: {e}",
                self.target.display()
            );
        }
    }
}

/// Whether this kernel mounts EROFS images from regular files, tried once per process with a
/// tiny image made in `scratch` (an existing directory, which is left as it was).
pub fn file_mounts_supported(scratch: &Path) -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| try_mount(scratch).is_ok())
}

fn try_mount(scratch: &Path) -> Result<(), ImageError> {
    let unique = format!(".erofs-probe-{}", std::process::id());
    let image = scratch.join(format!("{unique}.img"));
    let target = scratch.join(&unique);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let result = (|| {
        let file = File::create(&image).map_err(io_err(&image))?;
        let tree = Tree {
            inodes: vec![Inode::new(Kind::Directory(BTreeMap::new()), 0o755)],
        };
        write_metadata(&file, &image, &tree, 0)?;
        (&file).flush().map_err(io_err(&image))?;
        std::fs::create_dir(&target).map_err(io_err(&target))?;
        let mount = ErofsMount::mount(&image, &target).map_err(io_err(&target))?;
        std::fs::read_dir(mount.path()).map_err(io_err(&target))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir(&target);
    let _ = std::fs::remove_file(&image);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_blocks_hold_sorted_entries_and_split_at_block_size() {
        let names: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("name-{i:03}").into_bytes())
            .collect();
        let entries: Vec<(&[u8], u64, u8)> =
            names.iter().map(|n| (n.as_slice(), 7u64, 1u8)).collect();
        let mut out = Vec::new();
        dir_blocks(&entries, &mut out).unwrap();
        // 12 + 8 bytes per entry: 25 fit in a 512-byte block.
        assert_eq!(out.len(), 4 * BLOCK_SIZE as usize);
        let first_nameoff = u16::from_le_bytes([out[8], out[9]]) as usize;
        assert_eq!(first_nameoff / DIRENT_SIZE, 25);
        assert_eq!(&out[first_nameoff..first_nameoff + 8], b"name-000");
        let second = &out[BLOCK_SIZE as usize..];
        let nameoff = u16::from_le_bytes([second[8], second[9]]) as usize;
        assert_eq!(&second[nameoff..nameoff + 8], b"name-025");
    }

    #[test]
    fn xattrs_map_to_erofs_prefixes() {
        assert_eq!(
            xattr_index(b"trusted.overlay.opaque"),
            Some((4, &b"overlay.opaque"[..]))
        );
        assert_eq!(
            xattr_index(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(xattr_index(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(xattr_index(b"system.other"), None);
        assert_eq!(xattr_index(b"user."), None);
        let body = xattr_body(&[(b"user.a".to_vec(), b"xyz".to_vec())]).unwrap();
        // Header, then 4 bytes of entry header, "a", "xyz", padded to 4.
        assert_eq!(body.len(), XATTR_HEADER_SIZE + 8);
        assert_eq!(&body[12..16], &[1, 1, 3, 0]);
    }

    #[test]
    fn device_numbers_encode_as_the_kernel_does() {
        assert_eq!(encode_dev(0, 0), 0);
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x1234), 0x34 | (8 << 8) | (0x1200 << 12));
    }
}

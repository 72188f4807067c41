//! Layer images (EROFS indexes of a layer's tar) mounted by the kernel, against the same layer
//! unpacked into a directory tree (run as root: mounts, device nodes, `trusted.*` xattrs).

mod support;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use kiln_fs::erofs::ErofsMount;
use kiln_fs::resolve::Root;
use kiln_fs::unpack::{unpack_layer_image, unpack_layer_tree, UnpackError};
use kiln_oci::Digest;
use support::Layer;

/// Everything a lower dir shows of each path: type, mode, owner, times, link count, size,
/// content or target or device, and xattrs.
fn full_listing(root: &Path) -> BTreeMap<String, String> {
    support::describe_tree(root, &|path, meta| {
        let kind = meta.file_type();
        if kind.is_char_device() && meta.rdev() == 0 {
            // A whiteout: overlayfs shows nothing of it but that the name is gone, and an
            // unpacked tree dates it when it was made.
            return "whiteout".to_owned();
        }
        let what = if kind.is_dir() {
            format!("dir nlink={}", meta.nlink())
        } else if kind.is_symlink() {
            format!("-> {}", std::fs::read_link(path).unwrap().display())
        } else if kind.is_file() {
            let content = std::fs::read(path).unwrap();
            format!(
                "file nlink={} size={} {}",
                meta.nlink(),
                meta.size(),
                Digest::sha256_of(&content)
            )
        } else if kind.is_char_device() {
            format!("char {}", meta.rdev())
        } else if kind.is_block_device() {
            format!("block {}", meta.rdev())
        } else if kind.is_fifo() {
            "fifo".to_owned()
        } else {
            "other".to_owned()
        };
        let mut xattrs: Vec<String> = xattr_names(path)
            .into_iter()
            .map(|name| {
                let value = xattr_value(path, &name);
                format!(
                    "{}={}",
                    String::from_utf8_lossy(&name),
                    String::from_utf8_lossy(&value)
                )
            })
            .collect();
        xattrs.sort();
        format!(
            "{what} {:o} {}:{} mtime={}.{} xattrs={xattrs:?}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            meta.mtime(),
            meta.mtime_nsec(),
        )
    })
}

fn xattr_names(path: &Path) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut buf).unwrap_or(0);
    buf[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| n.to_vec())
        .collect()
}

fn xattr_value(path: &Path, name: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let name = std::ffi::OsStr::from_bytes(name);
    let n = rustix::fs::lgetxattr(path, name, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// A layer with one of everything an image holds.
fn rich_layer() -> Layer {
    let mut layer = Layer::new()
        .dir("etc")
        .file("etc/hostname", b"kiln\n")
        .file("etc/.wh.passwd", b"")
        .dir("opt")
        .file("opt/.wh..wh..opq", b"")
        .file("opt/z", b"z")
        .dir_owned("home", 0o755, 0, 0)
        .dir_owned("home/app", 0o700, 1000, 1001)
        .file_owned("home/app/setuid", b"#!/bin/sh\n", 0o4755, 1000, 1001)
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/tool", &vec![7u8; 70_000])
        .hardlink("usr/bin/tool-link", "usr/bin/tool")
        .symlink("bin", "usr/bin")
        .symlink("usr/long-link", &"x/".repeat(45))
        .file("empty", b"")
        .node("dev-null", tar::EntryType::Char, 1, 3)
        .node("loop0", tar::EntryType::Block, 7, 0)
        .node("pipe", tar::EntryType::Fifo, 0, 0)
        .pax_file(
            &[
                ("SCHILY.xattr.user.note", b"hello"),
                ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"),
                ("mtime", b"1600000000.5"),
            ],
            "usr/bin/ping",
            b"ping",
            0o755,
        )
        .dir("many");
    // Enough entries for a directory of several blocks, names of varied lengths.
    for i in 0..300 {
        layer = layer.file(
            &format!("many/{}{i}", "n".repeat(i % 40)),
            &[b'a' + (i % 26) as u8],
        );
    }
    // A file replaced by a directory and a directory replaced by a file, later in the layer.
    layer
        .file("swap", b"first a file")
        .dir("swap")
        .file("swap/inside", b"then a directory")
        .dir("gone")
        .file("gone/a", b"a")
        .file("gone", b"now a file")
}

fn image_and_tree(name: &str, bytes: &[u8]) -> (tempfile::TempDir, ErofsMount) {
    let dir = tempfile::tempdir().unwrap();
    let digest = Digest::sha256_of(bytes);
    let image = dir.path().join(format!("{name}.img"));
    unpack_layer_image(&image, bytes, &digest, None).unwrap();
    let mounted = dir.path().join("mounted");
    std::fs::create_dir(&mounted).unwrap();
    let mount = ErofsMount::mount(&image, &mounted).unwrap();
    (dir, mount)
}

#[test]
fn a_mounted_image_shows_what_the_unpacked_tree_holds() {
    for (name, bytes) in [("plain", rich_layer().tar()), ("gzip", rich_layer().gzip())] {
        let (dir, mount) = image_and_tree(name, &bytes);
        let unpacked = dir.path().join("unpacked");
        std::fs::create_dir(&unpacked).unwrap();
        let digest = Digest::sha256_of(&bytes);
        unpack_layer_tree(&Root::open(&unpacked).unwrap(), &bytes[..], &digest, None).unwrap();
        let expected = full_listing(&unpacked);
        assert!(expected.len() > 300, "{name}: the layer unpacked");
        assert_eq!(expected["etc/passwd"], "whiteout", "{name}");
        assert!(
            expected["opt"].contains("trusted.overlay.opaque=y"),
            "{name}"
        );
        let shown = full_listing(mount.path());
        let differing: Vec<_> = expected
            .iter()
            .filter(|(path, what)| shown.get(*path) != Some(what))
            .map(|(path, what)| format!("{path}: tree {what} / image {:?}", shown.get(path)))
            .chain(
                shown
                    .keys()
                    .filter(|path| !expected.contains_key(*path))
                    .map(|path| format!("{path}: only in the image")),
            )
            .collect();
        assert!(differing.is_empty(), "{name}: {differing:#?}");
    }
}

#[test]
fn the_image_holds_the_tar_and_only_a_little_more() {
    let mut layer = Layer::new().dir("data");
    for i in 0..2000 {
        layer = layer.file(&format!("data/{i}"), format!("file {i}\n").as_bytes());
    }
    let bytes = layer.tar();
    let (dir, mount) = image_and_tree("many", &bytes);
    let image_size = std::fs::metadata(dir.path().join("many.img"))
        .unwrap()
        .len();
    // 2000 inodes of 64 bytes and their directory entries: well under 100 bytes per file
    // beyond the tar.
    assert!(
        image_size < 4096 + bytes.len() as u64 + 2000 * 100,
        "{image_size} bytes for a {}-byte tar",
        bytes.len()
    );
    assert_eq!(
        std::fs::read_to_string(mount.path().join("data/1999")).unwrap(),
        "file 1999\n"
    );
    assert_eq!(
        std::fs::read_dir(mount.path().join("data"))
            .unwrap()
            .count(),
        2000
    );
}

#[test]
fn layers_an_image_cannot_stand_for_alone_are_refused() {
    let cases = [
        ("parent", Layer::new().file("usr/bin/x", b"x")),
        ("whiteout", Layer::new().file("etc/.wh.passwd", b"")),
        ("opaque", Layer::new().file("opt/.wh..wh..opq", b"")),
        ("hardlink", Layer::new().hardlink("copy", "original")),
        (
            "device",
            Layer::new().node("dev-zero", tar::EntryType::Char, 0, 0),
        ),
        (
            "overlay xattr",
            Layer::new().pax_file(
                &[("SCHILY.xattr.trusted.overlay.redirect", b"/x")],
                "f",
                b"",
                0o644,
            ),
        ),
        (
            "through a symlink",
            Layer::new()
                .symlink("lib", "usr/lib")
                .dir("usr")
                .dir("usr/lib")
                .file("lib/x", b"x"),
        ),
    ];
    for (name, layer) in cases {
        let dir = tempfile::tempdir().unwrap();
        let bytes = layer.tar();
        let digest = Digest::sha256_of(&bytes);
        let result = unpack_layer_image(&dir.path().join("img"), &bytes[..], &digest, None);
        assert!(
            matches!(result, Err(UnpackError::InvalidEntry { .. })),
            "{name}: {result:?}"
        );
    }
}

#[test]
fn a_damaged_or_substituted_layer_is_refused() {
    let bytes = rich_layer().gzip();
    let digest = Digest::sha256_of(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let other = Digest::sha256_of(b"something else");
    let result = unpack_layer_image(&dir.path().join("a"), &bytes[..], &other, None);
    assert!(
        matches!(result, Err(UnpackError::DigestMismatch { .. })),
        "{result:?}"
    );
    let result = unpack_layer_image(&dir.path().join("b"), &bytes[..], &digest, Some(&other));
    assert!(
        matches!(result, Err(UnpackError::DiffIdMismatch { .. })),
        "{result:?}"
    );
    let mut cut = bytes.clone();
    cut.truncate(bytes.len() / 2);
    let cut_digest = Digest::sha256_of(&cut);
    let result = unpack_layer_image(&dir.path().join("c"), &cut[..], &cut_digest, None);
    assert!(
        matches!(result, Err(UnpackError::Stream { .. })),
        "{result:?}"
    );
}

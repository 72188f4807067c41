//! Arbitrary bytes as a layer blob (plain, or gzip-compressed by the harness when the first
//! byte is odd, so the tar parser is reached through the decompressor too), applied with
//! `unpack_layer` to a fresh root. The root starts with symlinks that point out of it (relative
//! and absolute) and sits in a directory that also holds sentinel files. Whatever the layer
//! holds, unpacking must return (Ok or an error, never panic) and leave everything outside the
//! root as it was: nothing created, changed, linked to or removed.

#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use kiln_fs::resolve::Root;
use kiln_fs::unpack::{unpack_layer, UnpackOptions};
use kiln_oci::Digest;
use libfuzzer_sys::fuzz_target;

/// What is checked of each path outside the root; `nlink` and `ino` catch a hard link made to
/// an outside file, the rest any write through an escaped path.
#[derive(Debug, PartialEq, Eq)]
struct State {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    content: Option<Vec<u8>>,
    link: Option<PathBuf>,
}

fn record(dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, State>) {
    let meta = fs::symlink_metadata(dir).expect("outside paths stay readable");
    out.insert(dir.to_owned(), state(dir, &meta));
    if !meta.is_dir() {
        return;
    }
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("outside dirs stay readable")
        .map(|e| e.expect("readable entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path != skip {
            record(&path, skip, out);
        }
    }
}

fn state(path: &Path, meta: &fs::Metadata) -> State {
    State {
        ino: meta.ino(),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        nlink: meta.nlink(),
        size: meta.size(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        content: meta
            .is_file()
            .then(|| fs::read(path).expect("readable sentinel")),
        link: meta
            .file_type()
            .is_symlink()
            .then(|| fs::read_link(path).expect("readable link")),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, tar)) = data.split_first() else {
        return;
    };
    let blob = if mode & 1 == 1 {
        gzip(tar)
    } else {
        tar.to_vec()
    };
    let digest = Digest::sha256_of(&blob);

    // tmpfs: the work is file creation, which costs a disk's journal per file otherwise.
    let base = std::env::var_os("KILN_FUZZ_TMP").unwrap_or_else(|| "/dev/shm".into());
    let dir = tempfile::Builder::new()
        .prefix("kiln-unpack-fuzz")
        .tempdir_in(base)
        .expect("temp dir");
    let top = dir.path();
    let rootfs = top.join("root");
    fs::create_dir(&rootfs).unwrap();
    fs::write(top.join("sentinel"), b"outside the root").unwrap();
    fs::create_dir(top.join("outside")).unwrap();
    fs::write(top.join("outside/inner"), b"also outside").unwrap();
    fs::set_permissions(top.join("outside/inner"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("../outside", rootfs.join("up")).unwrap();
    std::os::unix::fs::symlink(top.join("outside"), rootfs.join("abs")).unwrap();
    std::os::unix::fs::symlink("../sentinel", rootfs.join("file")).unwrap();
    fs::create_dir(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();

    let mut before = BTreeMap::new();
    record(top, &rootfs, &mut before);

    let root = Root::open(&rootfs).expect("opening the fresh root");
    let _ = unpack_layer(&root, blob.as_slice(), &digest, UnpackOptions::default());
    drop(root);

    let mut after = BTreeMap::new();
    record(top, &rootfs, &mut after);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "paths outside the root were created or removed"
    );
    for (path, was) in &before {
        assert_eq!(
            &after[path],
            was,
            "{} outside the root changed",
            path.display()
        );
    }
    let root_meta = fs::symlink_metadata(&rootfs).expect("the root is still there");
    assert!(
        root_meta.is_dir(),
        "the root was replaced by a non-directory"
    );
});

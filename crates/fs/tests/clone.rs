//! `kiln_fs::clone::clone_tree` against `cp -a` as the oracle, on a tree holding every kind of
//! entry and metadata a rootfs has (needs root, for owners, devices and trusted xattrs).

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_fs::clone::clone_tree;
use kiln_testkit::tree::Tree;

fn set_times(path: &Path, seconds: i64) {
    let time = filetime(seconds);
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: time,
            last_modification: time,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn filetime(seconds: i64) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: seconds,
        tv_nsec: 123_456_789,
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// A tree with directories (one read-only, one sticky), files with special bits, owners and
/// xattrs (a file capability among them), hard links, symlinks (relative, absolute,
/// dangling), a fifo, a character device and a socket, each with its own times.
fn source_tree(root: &Path) {
    let mkdir = |rel: &str, mode: u32| {
        let path = root.join(rel);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let file = |rel: &str, content: &[u8], mode: u32, owner: (u32, u32)| {
        let path = root.join(rel);
        std::fs::write(&path, content).unwrap();
        chown(&path, owner.0, owner.1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mkdir("bin", 0o755);
    mkdir("tmp", 0o1777);
    mkdir("etc/ssl", 0o750);
    mkdir("home/app", 0o700);
    chown(&root.join("home/app"), 1000, 1000);
    file("bin/tool", b"#!/bin/sh\necho tool\n", 0o4755, (0, 0));
    file("bin/group-tool", b"binary", 0o2711, (0, 50));
    file("etc/ssl/key.pem", b"not a real key", 0o600, (0, 0));
    file(
        "home/app/notes.txt",
        &vec![b'x'; 300_000],
        0o640,
        (1000, 1000),
    );
    file("etc/empty", b"", 0o644, (0, 0));
    rustix::fs::setxattr(
        root.join("bin/tool"),
        "security.capability",
        // VFS_CAP_REVISION_2, effective, cap_net_bind_service permitted.
        &[0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::setxattr(
        root.join("etc/ssl/key.pem"),
        "user.origin",
        b"test",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        root.join("etc"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::fs::hard_link(root.join("bin/tool"), root.join("bin/tool-again")).unwrap();
    std::fs::hard_link(root.join("bin/tool"), root.join("etc/tool-link")).unwrap();
    symlink("tool", root.join("bin/relative")).unwrap();
    symlink("/etc/ssl/key.pem", root.join("bin/absolute")).unwrap();
    symlink("../nowhere", root.join("bin/dangling")).unwrap();
    chown(&root.join("bin/dangling"), 7, 8);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("tmp/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o620),
        0,
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("tmp/null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let socket = std::os::unix::net::UnixListener::bind(root.join("tmp/socket")).unwrap();
    drop(socket);
    // A read-only directory with contents: the copy must still be able to fill it.
    mkdir("readonly/inner", 0o755);
    file("readonly/inner/data", b"data", 0o444, (0, 0));
    std::fs::set_permissions(
        root.join("readonly"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    let mut seconds = 1_600_000_000;
    for path in walk(root) {
        set_times(&path, seconds);
        seconds += 1000;
    }
}

/// Every path below `root`, children before their directory (so setting a child's times does
/// not move its parent's afterwards).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out.sort();
    out.reverse();
    out
}

/// Modification times of every path, which the tree scan leaves out. (Access times are kept
/// too, but reading the source for one copy moves its access times before the other copy.)
fn times(root: &Path) -> BTreeMap<PathBuf, (i64, i64)> {
    let mut out = BTreeMap::new();
    for path in walk(root).into_iter().chain([root.to_path_buf()]) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        out.insert(rel, (meta.mtime(), meta.mtime_nsec()));
    }
    out
}

fn cp_a(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

fn assert_same(ours: &Path, oracle: &Path) {
    let ours_tree = Tree::scan(ours, &[]).unwrap();
    let oracle_tree = Tree::scan(oracle, &[]).unwrap();
    let diff = ours_tree.diff(&oracle_tree);
    assert!(diff.is_empty(), "clone_tree vs cp -a:\n{diff}");
    assert_eq!(times(ours), times(oracle));
}

#[test]
fn a_tree_is_copied_as_cp_a_copies_it() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    std::fs::create_dir(&source).unwrap();
    source_tree(&source);
    let ours = work.path().join("ours");
    clone_tree(&source, &ours).unwrap();
    let oracle = work.path().join("oracle");
    cp_a(&source, &oracle);
    assert_same(&ours, &oracle);
    // Hard links are links again, to each other and not to the source.
    let tool = std::fs::metadata(ours.join("bin/tool")).unwrap();
    assert_eq!(tool.nlink(), 3);
    assert_ne!(
        tool.ino(),
        std::fs::metadata(source.join("bin/tool")).unwrap().ino()
    );
    // The copy is a copy: writing to it leaves the source alone.
    std::fs::write(ours.join("home/app/notes.txt"), "changed").unwrap();
    assert_eq!(
        std::fs::read(source.join("home/app/notes.txt"))
            .unwrap()
            .len(),
        300_000
    );
}

#[test]
fn contents_go_into_an_existing_directory_which_takes_the_sources_metadata() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    std::fs::create_dir(&source).unwrap();
    source_tree(&source);
    chown(&source, 33, 33);
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o751)).unwrap();
    set_times(&source, 1_500_000_000);
    let ours = work.path().join("ours");
    std::fs::create_dir(&ours).unwrap();
    clone_tree(&source, &ours).unwrap();
    let oracle = work.path().join("oracle");
    std::fs::create_dir(&oracle).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", source.display()))
        .arg(&oracle)
        .status()
        .unwrap();
    assert!(status.success());
    assert_same(&ours, &oracle);
    let root = std::fs::symlink_metadata(&ours).unwrap();
    assert_eq!(
        (root.uid(), root.mode() & 0o7777, root.mtime()),
        (33, 0o751, 1_500_000_000)
    );
}

#[test]
fn single_files_and_links_are_copied_and_nothing_is_overwritten() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("file");
    std::fs::write(&file, "content").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o751)).unwrap();
    let copy = work.path().join("copy");
    clone_tree(&file, &copy).unwrap();
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "content");
    assert_eq!(std::fs::metadata(&copy).unwrap().mode() & 0o7777, 0o751);

    let link = work.path().join("link");
    symlink("file", &link).unwrap();
    let link_copy = work.path().join("link-copy");
    clone_tree(&link, &link_copy).unwrap();
    assert_eq!(std::fs::read_link(&link_copy).unwrap(), Path::new("file"));

    let error = clone_tree(&file, &copy).unwrap_err();
    assert_eq!(error.path, copy);
    assert_eq!(error.source.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "content");
    let dir = work.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let error = clone_tree(&dir, &copy).unwrap_err();
    assert!(
        error.to_string().contains(&copy.display().to_string()),
        "{error}"
    );
}

#[test]
fn a_missing_source_is_an_error_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("missing");
    let error = clone_tree(&missing, &work.path().join("to")).unwrap_err();
    assert_eq!(error.path, missing);
    assert!(!work.path().join("to").exists());
}

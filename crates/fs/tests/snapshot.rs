//! Snapshot correctness on real directories (run as root: chown, device nodes and xattrs).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_fs::snapshot::{
    ChangeKind, Diff, IgnoreOptions, Index, SnapshotMode, SnapshotOptions, Snapshotter,
};

fn options(mode: SnapshotMode) -> SnapshotOptions {
    SnapshotOptions {
        mode,
        ignore: IgnoreOptions {
            extra: vec![PathBuf::from("/extra-ignored")],
            ..IgnoreOptions::default()
        },
    }
}

fn baseline(root: &Path) -> Snapshotter {
    let mut s = Snapshotter::new(root, Index::new(), &options(SnapshotMode::Exact)).unwrap();
    s.rescan().unwrap();
    s
}

fn summary(diff: &Diff) -> Vec<(String, ChangeKind)> {
    diff.changes
        .iter()
        .map(|c| (c.path.to_string_lossy().into_owned(), c.kind))
        .collect()
}

fn kinds(list: &[(&str, ChangeKind)]) -> Vec<(String, ChangeKind)> {
    list.iter().map(|(p, k)| (p.to_string(), *k)).collect()
}

fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn sh(cmd: &str) {
    let status = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(status.success(), "{cmd} failed");
}

use ChangeKind::*;

#[test]
fn unchanged_tree_reports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "etc/passwd", "root:x:0:0::/root:/bin/sh\n");
    symlink("passwd", root.join("etc/link")).unwrap();
    let mut s = baseline(root);
    assert!(s.snapshot().unwrap().is_empty());
    assert!(s.snapshot().unwrap().is_empty());
}

#[test]
fn new_modified_and_deleted_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "a/keep", "keep");
    write(root, "a/modify", "old");
    write(root, "a/delete", "bye");
    let mut s = baseline(root);
    write(root, "a/new", "new");
    write(root, "a/modify", "new content");
    fs::remove_file(root.join("a/delete")).unwrap();
    let diff = s.snapshot().unwrap();
    assert_eq!(
        summary(&diff),
        kinds(&[
            ("a", Modified),
            ("a/delete", Deleted),
            ("a/modify", Modified),
            ("a/new", Added)
        ])
    );
    assert!(
        s.snapshot().unwrap().is_empty(),
        "second snapshot must be clean"
    );
}

#[test]
fn same_size_rewrite_right_after_the_snapshot_is_seen() {
    // Rewrites land as close to the snapshot as a test can get them; whether or not the
    // filesystem's timestamps move within that time, the change must be reported.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for round in 0..20 {
        let name = format!("f{round}");
        write(root, &name, "aaaa");
        let mut s = baseline(root);
        fs::write(root.join(&name), "bbbb").unwrap();
        let diff = s.snapshot().unwrap();
        assert_eq!(summary(&diff), kinds(&[(&name, Modified)]), "round {round}");
    }
}

#[test]
fn rewrite_with_restored_mtime_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "conf", "value=1\n");
    sh(&format!(
        "touch -d '2001-02-03 04:05:06' {}",
        root.join("conf").display()
    ));
    std::thread::sleep(std::time::Duration::from_millis(30));
    let mut s = baseline(root);
    fs::write(root.join("conf"), "value=2\n").unwrap();
    sh(&format!(
        "touch -d '2001-02-03 04:05:06' {}",
        root.join("conf").display()
    ));
    assert_eq!(
        summary(&s.snapshot().unwrap()),
        kinds(&[("conf", Modified)])
    );
}

#[test]
fn metadata_only_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "chmod", "x");
    write(root, "chown", "x");
    write(root, "xattr", "x");
    symlink("chmod", root.join("link")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let mut s = baseline(root);
    fs::set_permissions(root.join("chmod"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::lchown(root.join("chown"), Some(1234), Some(5678)).unwrap();
    rustix::fs::lsetxattr(
        root.join("xattr"),
        "user.kiln",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::remove_file(root.join("link")).unwrap();
    symlink("chown", root.join("link")).unwrap();
    let diff = s.snapshot().unwrap();
    assert_eq!(
        summary(&diff),
        kinds(&[
            ("chmod", Modified),
            ("chown", Modified),
            ("link", Modified),
            ("xattr", Modified)
        ])
    );
}

#[test]
fn hardlink_added_reports_both_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "bin/tool", "binary");
    std::thread::sleep(std::time::Duration::from_millis(30));
    let mut s = baseline(root);
    fs::hard_link(root.join("bin/tool"), root.join("bin/alias")).unwrap();
    assert_eq!(
        summary(&s.snapshot().unwrap()),
        kinds(&[
            ("bin", Modified),
            ("bin/alias", Added),
            ("bin/tool", Modified)
        ])
    );
}

#[test]
fn type_changes_and_deleted_trees() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "was_dir/child", "c");
    write(root, "was_file", "f");
    write(root, "tree/a/b/c", "deep");
    write(root, "tree/x", "x");
    write(root, "recreated/old", "old");
    let mut s = baseline(root);
    fs::remove_dir_all(root.join("was_dir")).unwrap();
    write(root, "was_dir", "now a file");
    fs::remove_file(root.join("was_file")).unwrap();
    write(root, "was_file/child", "now a dir");
    fs::remove_dir_all(root.join("tree")).unwrap();
    fs::rename(root.join("recreated"), root.join("moved-away")).unwrap();
    write(root, "recreated/new", "new");
    let diff = s.snapshot().unwrap();
    let got = summary(&diff);
    for expected in [
        ("was_dir", Modified),
        ("was_dir/child", Deleted),
        ("was_file", Modified),
        ("was_file/child", Added),
        ("tree", Deleted),
        ("tree/a", Deleted),
        ("tree/a/b/c", Deleted),
        ("recreated", Replaced),
        ("recreated/new", Added),
        ("recreated/old", Deleted),
        ("moved-away", Added),
    ] {
        assert!(
            got.contains(&(expected.0.to_string(), expected.1)),
            "{expected:?} missing in {got:?}"
        );
    }
}

#[test]
fn ignored_paths_are_never_reported() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for d in [
        "proc",
        "sys",
        "dev",
        "kiln",
        "kaniko",
        "var/run",
        "extra-ignored",
    ] {
        write(root, &format!("{d}/before"), "x");
    }
    let mut s = baseline(root);
    for d in [
        "proc",
        "sys",
        "dev",
        "kiln",
        "kaniko",
        "var/run",
        "extra-ignored",
    ] {
        write(root, &format!("{d}/after"), "y");
        fs::remove_file(root.join(d).join("before")).unwrap();
    }
    write(root, "var/visible", "v");
    let diff = s.snapshot().unwrap();
    assert_eq!(
        summary(&diff),
        kinds(&[("var", Modified), ("var/visible", Added)])
    );
    assert!(s.snapshot().unwrap().is_empty());
}

#[test]
fn mount_points_under_the_root_are_never_walked() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "mnt/cache/.keep", "");
    let mut s = baseline(root);
    let mount_point = root.join("mnt/cache");
    sh(&format!(
        "mount -t tmpfs kiln-test {}",
        mount_point.display()
    ));
    write(root, "mnt/cache/inside-the-mount", "x");
    write(root, "outside", "y");
    let diff = s.snapshot();
    sh(&format!("umount {}", mount_point.display()));
    assert_eq!(summary(&diff.unwrap()), kinds(&[("outside", Added)]));
}

#[test]
fn volume_writes_are_kept() {
    // BuildKit keeps writes under a declared VOLUME; nothing special-cases them.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("data")).unwrap();
    let mut s = baseline(root);
    write(root, "data/db", "rows");
    assert_eq!(
        summary(&s.snapshot().unwrap()),
        kinds(&[("data", Modified), ("data/db", Added)])
    );
}

#[test]
fn listed_paths_need_no_walk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "app/old", "1");
    write(root, "elsewhere/untouched", "1");
    let mut s = baseline(root);
    write(root, "app/new/deep/file", "2");
    write(root, "app/single", "3");
    // A change the engine did not report is not looked for.
    write(root, "elsewhere/unlisted", "4");
    let diff = s.snapshot_paths(&["/app/new", "/app/single"]).unwrap();
    assert_eq!(
        summary(&diff),
        kinds(&[
            ("app", Modified),
            ("app/new", Added),
            ("app/new/deep", Added),
            ("app/new/deep/file", Added),
            ("app/single", Added),
        ])
    );
    // A full walk later still finds the unlisted one, and only it.
    assert_eq!(
        summary(&s.snapshot().unwrap()),
        kinds(&[("elsewhere", Modified), ("elsewhere/unlisted", Added)])
    );
}

#[test]
fn listed_path_that_is_gone_is_deleted_with_its_subtree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "app/lib/a", "1");
    write(root, "app/lib/sub/b", "2");
    write(root, "app/keep", "3");
    let mut s = baseline(root);
    fs::remove_dir_all(root.join("app/lib")).unwrap();
    let diff = s.snapshot_paths(&["app/lib"]).unwrap();
    assert_eq!(
        summary(&diff),
        kinds(&[
            ("app", Modified),
            ("app/lib", Deleted),
            ("app/lib/a", Deleted),
            ("app/lib/sub", Deleted),
            ("app/lib/sub/b", Deleted),
        ])
    );
    assert!(
        s.snapshot().unwrap().is_empty(),
        "the index matches the tree again"
    );
}

#[test]
fn index_recorded_by_a_writer_is_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "usr/bin/sh", "shell");
    write(root, "usr/lib/libc", "libc");
    let mut index = Index::new();
    for rel in ["usr", "usr/bin", "usr/bin/sh", "usr/lib", "usr/lib/libc"] {
        index.record(
            Path::new(rel),
            &fs::symlink_metadata(root.join(rel)).unwrap(),
        );
    }
    index.seal(root).unwrap();
    let mut s = Snapshotter::new(root, index, &options(SnapshotMode::Exact)).unwrap();
    assert!(s.snapshot().unwrap().is_empty());
    fs::write(root.join("usr/bin/sh"), "SHELL").unwrap();
    assert_eq!(
        summary(&s.snapshot().unwrap()),
        kinds(&[("usr/bin/sh", Modified)])
    );
}

#[test]
fn kaniko_modes_map_to_their_meaning() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "f", "x");
    write(root, "g", "y");
    std::thread::sleep(std::time::Duration::from_millis(30));
    for (mode, expect_chmod) in [(SnapshotMode::Full, true), (SnapshotMode::MtimeOnly, false)] {
        let mut s = Snapshotter::new(root, Index::new(), &options(mode)).unwrap();
        s.rescan().unwrap();
        let current = fs::metadata(root.join("f")).unwrap().permissions().mode();
        fs::set_permissions(root.join("f"), fs::Permissions::from_mode(current ^ 0o010)).unwrap();
        // Same bytes written again: only the timestamps move.
        let before = fs::metadata(root.join("g")).unwrap();
        fs::write(root.join("g"), "y").unwrap();
        let mtime = filetime_of(&before);
        sh(&format!("touch -d @{mtime} {}", root.join("g").display()));
        let got = summary(&s.snapshot().unwrap());
        assert_eq!(
            got.contains(&("f".into(), Modified)),
            expect_chmod,
            "{mode:?}: {got:?}"
        );
        assert!(!got.contains(&("g".into(), Modified)), "{mode:?}: {got:?}");
    }
    assert_eq!(
        "redo"
            .parse::<kiln_fs::snapshot::KanikoSnapshotMode>()
            .map(SnapshotMode::from)
            .unwrap(),
        SnapshotMode::Exact
    );
    assert!("fast"
        .parse::<kiln_fs::snapshot::KanikoSnapshotMode>()
        .is_err());
}

fn filetime_of(meta: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("{}.{:09}", meta.mtime(), meta.mtime_nsec())
}

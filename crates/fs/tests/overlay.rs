//! Layer trees stacked by overlayfs against the same layers applied onto one rootfs (run as
//! root: overlay mounts, device nodes, `trusted.*` xattrs).

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_fs::overlay::OverlayMount;
use kiln_fs::resolve::Root;
use kiln_fs::snapshot::{ChangeKind, IgnoreOptions, Index, SnapshotOptions, Snapshotter};
use kiln_fs::trees::{LayerTree, LayerTrees, TreeError};
use kiln_fs::unpack::{unpack_layer, UnpackError, UnpackOptions};
use kiln_oci::Digest;
use support::Layer;

/// The trees in a store (its lock and stamp files, named with a leading dot, left out).
fn trees_in(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// A layer blob (plain tar) with its digest, which is also its diff ID.
struct Blob {
    path: PathBuf,
    digest: Digest,
}

fn blob(dir: &Path, name: &str, layer: Layer) -> Blob {
    let bytes = layer.tar();
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    Blob {
        path,
        digest: Digest::sha256_of(&bytes),
    }
}

/// What a tree shows, path by path: type, mode, owner, and content or link target. Not link
/// counts: overlayfs reports a lower file's own, which counts a hard link a higher layer
/// deleted (as every overlay-based builder does).
fn listing(root: &Path) -> BTreeMap<String, String> {
    support::describe_tree(root, &|path, meta| {
        let kind = meta.file_type();
        let what = if kind.is_dir() {
            "dir".to_owned()
        } else if kind.is_symlink() {
            format!("-> {}", std::fs::read_link(path).unwrap().display())
        } else if kind.is_file() {
            format!(
                "file {:?}",
                String::from_utf8_lossy(&std::fs::read(path).unwrap())
            )
        } else if kind.is_char_device() {
            format!("char {}", meta.rdev())
        } else {
            "other".to_owned()
        };
        format!(
            "{what} {:o} {}:{}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        )
    })
}

/// A base layer and one on top that deletes, hides, replaces and adds.
fn two_layers(dir: &Path) -> Vec<Blob> {
    let base = Layer::new()
        .dir("etc")
        .file("etc/a", b"a")
        .file("etc/b", b"b")
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/tool", b"tool")
        .hardlink("usr/bin/tool-link", "usr/bin/tool")
        .symlink("bin", "usr/bin")
        .dir("opt")
        .file("opt/x", b"x")
        .dir("opt/sub")
        .file("opt/sub/y", b"y")
        .dir_owned("tmp", 0o1777, 0, 0)
        .dir_owned("home", 0o755, 0, 0)
        .dir_owned("home/app", 0o700, 1000, 1000)
        .file("replaced", b"a file below");
    let top = Layer::new()
        .dir("etc")
        .file("etc/.wh.a", b"")
        .file("etc/c", b"c")
        .dir("opt")
        .file("opt/.wh..wh..opq", b"")
        .file("opt/z", b"z")
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/new", b"new")
        .file("usr/bin/.wh.tool-link", b"")
        .dir("home")
        .file("home/.wh.app", b"")
        .dir("replaced")
        .file("replaced/inside", b"now a directory");
    vec![blob(dir, "base.tar", base), blob(dir, "top.tar", top)]
}

#[test]
fn stacked_layer_images_show_what_applying_the_layers_gives() {
    let store = stacked_trees_show_what_applying_the_layers_gives(false);
    assert!(
        store.makes_images(),
        "this kernel mounts EROFS images from files"
    );
}

#[test]
fn stacked_directory_trees_show_what_applying_the_layers_gives() {
    stacked_trees_show_what_applying_the_layers_gives(true);
}

/// Stacks the trees of [`two_layers`] made by a store (making directories only, or images
/// where the kernel can), checks the merged view, and returns the store.
fn stacked_trees_show_what_applying_the_layers_gives(directories: bool) -> LayerTrees {
    let dir = tempfile::tempdir().unwrap();
    let layers = two_layers(dir.path());

    let applied = dir.path().join("applied");
    std::fs::create_dir(&applied).unwrap();
    let root = Root::open(&applied).unwrap();
    for layer in &layers {
        let file = std::fs::File::open(&layer.path).unwrap();
        unpack_layer(&root, file, &layer.digest, UnpackOptions::default()).unwrap();
    }

    let mut store = LayerTrees::open(dir.path().join("trees")).unwrap();
    if directories {
        store = store.directories_only();
    }
    let held: Vec<LayerTree> = layers
        .iter()
        .map(|l| store.get_or_unpack(&l.digest, &l.path, &l.digest).unwrap())
        .collect();
    let mut lowers: Vec<PathBuf> = held.iter().map(|t| t.path().to_path_buf()).collect();
    lowers.reverse();
    let [merged, upper, work] = ["merged", "upper", "work"].map(|d| {
        let path = dir.path().join(d);
        std::fs::create_dir(&path).unwrap();
        path
    });
    let mount = OverlayMount::mount(&merged, &lowers, &upper, &work).unwrap();

    let expected = listing(&applied);
    assert!(!expected.contains_key("etc/a") && expected.contains_key("opt/z"));
    assert_eq!(listing(&merged), expected);
    drop(mount);
    assert!(
        listing(&merged).is_empty(),
        "the overlay is unmounted when dropped"
    );
    // The trees never change: unpacked again (here, asked for again), they are reused as is.
    let again = store
        .get_or_unpack(&layers[1].digest, &layers[1].path, &layers[1].digest)
        .unwrap();
    assert_eq!(again.stored(), held[1].stored());
    assert_eq!(
        again.stored().is_dir(),
        directories || !store.makes_images()
    );
    store
}

#[test]
fn layers_that_need_the_layers_below_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("trees");
    let store = LayerTrees::open(&store_dir).unwrap();
    let cases = [
        ("parent", Layer::new().file("usr/bin/x", b"x")),
        ("whiteout", Layer::new().file("etc/.wh.passwd", b"")),
        ("opaque", Layer::new().file("opt/.wh..wh..opq", b"")),
        ("hardlink", Layer::new().hardlink("copy", "original")),
        (
            "device",
            Layer::new().node("dev-zero", tar::EntryType::Char, 0, 0),
        ),
    ];
    for (name, layer) in cases {
        let layer = blob(dir.path(), name, layer);
        let result = store.get_or_unpack(&layer.digest, &layer.path, &layer.digest);
        assert!(
            matches!(
                result,
                Err(TreeError::Unpack(
                    UnpackError::InvalidEntry { .. } | UnpackError::Apply { .. }
                ))
            ),
            "{name}: {result:?}"
        );
        assert_eq!(
            trees_in(&store_dir).len(),
            0,
            "{name}: something was left in the store"
        );
    }
}

#[test]
fn a_stopped_unpack_leaves_no_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("trees");
    let store = LayerTrees::open(&store_dir).unwrap();
    let mut layer = Layer::new().dir("data");
    for i in 0..64 {
        layer = layer.file(&format!("data/{i}"), &[b'x'; 8192]);
    }
    let layer = blob(dir.path(), "layer", layer);
    // Stops once the unpack has read a few times, as a cancelled build does.
    let reads = std::sync::atomic::AtomicUsize::new(0);
    let stop = || reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 3;
    let result = store.get_or_unpack_until(&layer.digest, &layer.path, &layer.digest, &stop);
    assert!(matches!(result, Err(TreeError::Stopped)), "{result:?}");
    let left: Vec<_> = std::fs::read_dir(&store_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != ".stamps" && name != ".mounts")
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
    // Not stopped, the same layer unpacks.
    let tree = store.get_or_unpack(&layer.digest, &layer.path, &layer.digest);
    assert!(tree.unwrap().path().join("data/63").is_file());
}

#[test]
fn opening_the_store_deletes_the_temporary_trees_of_dead_processes() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("trees");
    // pid 0x7fffffff is never a live process; this test's own pid is.
    let dead = store_dir.join(".unpacking-2147483647-0-abc");
    let live = store_dir.join(format!(".unpacking-{}-0-abc", std::process::id()));
    for tree in [&dead, &live] {
        std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
        std::fs::write(tree.join("usr/bin/x"), b"x").unwrap();
    }
    LayerTrees::open(&store_dir).unwrap();
    assert!(!dead.exists(), "a dead process's tree is deleted");
    assert!(
        live.join("usr/bin/x").exists(),
        "a live process's tree stays"
    );
}

#[test]
fn a_damaged_blob_leaves_no_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("trees");
    let store = LayerTrees::open(&store_dir).unwrap();
    let layer = blob(
        dir.path(),
        "layer",
        Layer::new().dir("etc").file("etc/a", b"a"),
    );
    let wrong = Digest::sha256_of(b"some other layer");
    let result = store.get_or_unpack(&wrong, &layer.path, &layer.digest);
    assert!(
        matches!(
            result,
            Err(TreeError::Unpack(UnpackError::DiffIdMismatch { .. }))
        ),
        "{result:?}"
    );
    assert_eq!(trees_in(&store_dir).len(), 0);
}

#[test]
fn concurrent_unpacks_of_one_layer_share_one_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("trees");
    let store = LayerTrees::open(&store_dir).unwrap();
    let mut layer = Layer::new().dir("data");
    for i in 0..200 {
        layer = layer.file(&format!("data/{i}"), format!("{i}").as_bytes());
    }
    let layer = blob(dir.path(), "layer", layer);
    let trees: Vec<LayerTree> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| store.get_or_unpack(&layer.digest, &layer.path, &layer.digest)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    assert!(trees.iter().all(|t| t.stored() == trees[0].stored()));
    let names = trees_in(&store_dir);
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(
        std::fs::read_dir(trees[0].path().join("data"))
            .unwrap()
            .count(),
        200
    );
}

/// The trees of [`two_layers`] mounted as an overlay with an empty upper dir.
struct Stack {
    dir: tempfile::TempDir,
    lowers: Vec<PathBuf>,
    merged: PathBuf,
    upper: PathBuf,
    _mount: OverlayMount,
    _held: Vec<LayerTree>,
}

impl Stack {
    fn mount() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let layers = two_layers(dir.path());
        let store = LayerTrees::open(dir.path().join("trees")).unwrap();
        let held: Vec<LayerTree> = layers
            .iter()
            .rev()
            .map(|l| store.get_or_unpack(&l.digest, &l.path, &l.digest).unwrap())
            .collect();
        let lowers: Vec<PathBuf> = held.iter().map(|t| t.path().to_path_buf()).collect();
        let [merged, upper, work] = ["merged", "upper", "work"].map(|d| {
            let path = dir.path().join(d);
            std::fs::create_dir(&path).unwrap();
            path
        });
        let mount = OverlayMount::mount(&merged, &lowers, &upper, &work).unwrap();
        Stack {
            dir,
            lowers,
            merged,
            upper,
            _mount: mount,
            _held: held,
        }
    }
}

/// Snapshot options that walk everything (no system paths or mount points left out).
fn stack_options() -> SnapshotOptions {
    SnapshotOptions {
        ignore: IgnoreOptions {
            system_paths: false,
            var_run: false,
            mount_points: false,
            extra: Vec::new(),
        },
        ..SnapshotOptions::default()
    }
}

/// Writing into a directory of a lower layer copies it up: a new inode below, the same inode
/// number through the mount. The snapshot must see a changed directory, not a replaced one
/// (which a layer would mark opaque, hiding everything else the lower layers have there).
#[test]
fn a_copied_up_directory_is_modified_not_replaced() {
    let stack = Stack::mount();
    let (merged, options) = (&stack.merged, stack_options());
    let mut snapshotter = Snapshotter::new(merged, Index::new(), &options).unwrap();
    snapshotter.rescan().unwrap();
    // Past the coarse clock tick the rescan observed in, so nothing is racy.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(merged.join("usr/bin/added"), b"added").unwrap();
    std::fs::remove_file(merged.join("etc/b")).unwrap();
    let diff = snapshotter.snapshot().unwrap();
    let changes: Vec<(String, ChangeKind)> = diff
        .changes
        .iter()
        .map(|c| (c.path.display().to_string(), c.kind))
        .collect();
    assert_eq!(
        changes,
        [
            ("etc".to_owned(), ChangeKind::Modified),
            ("etc/b".to_owned(), ChangeKind::Deleted),
            // Copied up with `usr/bin` (a new ctime); layers list every parent anyway.
            ("usr".to_owned(), ChangeKind::Modified),
            ("usr/bin".to_owned(), ChangeKind::Modified),
            ("usr/bin/added".to_owned(), ChangeKind::Added),
        ]
    );
}

/// The changes of a snapshot as (path, kind) pairs.
fn changes_of(diff: &kiln_fs::snapshot::Diff) -> Vec<(String, ChangeKind)> {
    diff.changes
        .iter()
        .map(|c| (c.path.display().to_string(), c.kind))
        .collect()
}

/// A snapshotter that reads the upper dir finds, step after step, exactly what a walk of the
/// whole mounted tree finds: writes, deletions of lower paths (whiteouts) and of paths an
/// earlier step wrote (no trace left in the upper dir), directories made opaque, replaced,
/// renamed and re-typed, links, and a step that changes nothing.
#[test]
fn snapshots_from_the_upper_dir_match_whole_walks() {
    use std::os::unix::fs::PermissionsExt;
    let stack = Stack::mount();
    let (merged, upper, options) = (&stack.merged, &stack.upper, stack_options());
    let mut walking = Snapshotter::new(merged, Index::new(), &options).unwrap();
    walking.rescan().unwrap();
    let mut following = Snapshotter::new(merged, Index::new(), &options).unwrap();
    following.rescan().unwrap();
    following.follow_upper_dir(upper).unwrap();
    // The same lower dirs without the upper dir, from which the third snapshotter fills its
    // index only where steps write.
    let [view, view_upper, view_work] = ["view", "view-upper", "view-work"].map(|d| {
        let path = stack.dir.path().join(d);
        std::fs::create_dir(&path).unwrap();
        path
    });
    let _view_mount = OverlayMount::mount(&view, &stack.lowers, &view_upper, &view_work).unwrap();
    let mut filling = Snapshotter::new(merged, Index::new(), &options).unwrap();
    filling.follow_upper_dir_over(upper, &view).unwrap();
    let m = |rel: &str| merged.join(rel);
    type Step<'a> = Box<dyn Fn() + 'a>;
    let steps: Vec<(&str, Step)> = vec![
        ("nothing", Box::new(|| {})),
        (
            "copy: a new tree, reported by its paths",
            Box::new(|| {
                std::fs::create_dir_all(m("data/copied")).unwrap();
                std::fs::write(m("data/copied/file"), b"copied").unwrap();
            }),
        ),
        (
            "delete the copied file",
            Box::new(|| std::fs::remove_file(m("data/copied/file")).unwrap()),
        ),
        (
            "write new and lower files",
            Box::new(|| {
                std::fs::write(m("etc/new"), b"new").unwrap();
                std::fs::write(m("usr/bin/tool"), b"changed tool").unwrap();
                std::fs::create_dir_all(m("srv/app/deep")).unwrap();
                std::fs::write(m("srv/app/deep/f"), b"f").unwrap();
            }),
        ),
        (
            "delete what an earlier step wrote and a lower file",
            Box::new(|| {
                std::fs::remove_file(m("etc/new")).unwrap();
                std::fs::remove_file(m("srv/app/deep/f")).unwrap();
                std::fs::remove_file(m("etc/c")).unwrap();
            }),
        ),
        (
            "replace a lower directory and an upper one",
            Box::new(|| {
                std::fs::remove_dir_all(m("opt")).unwrap();
                std::fs::create_dir(m("opt")).unwrap();
                std::fs::write(m("opt/only"), b"only").unwrap();
                std::fs::remove_dir_all(m("srv/app")).unwrap();
                std::fs::create_dir(m("srv/app")).unwrap();
                std::fs::write(m("srv/app/again"), b"again").unwrap();
            }),
        ),
        (
            "chmod, rename, a file becomes a directory, links",
            Box::new(|| {
                std::fs::set_permissions(m("usr"), std::fs::Permissions::from_mode(0o750)).unwrap();
                std::fs::rename(m("replaced"), m("moved")).unwrap_or_else(|_| {
                    std::fs::create_dir(m("moved")).unwrap();
                    std::fs::write(m("moved/inside"), b"now a directory").unwrap();
                    std::fs::remove_dir_all(m("replaced")).unwrap();
                });
                std::fs::remove_file(m("etc/b")).unwrap();
                std::fs::create_dir(m("etc/b")).unwrap();
                std::fs::write(m("etc/b/in"), b"in").unwrap();
                std::os::unix::fs::symlink("/nowhere", m("srv/link")).unwrap();
                std::fs::hard_link(m("usr/bin/new"), m("usr/bin/new-link")).unwrap();
            }),
        ),
        (
            "remove a whole new tree",
            Box::new(|| {
                std::fs::remove_dir_all(m("srv")).unwrap();
                std::fs::remove_dir_all(m("moved")).unwrap();
            }),
        ),
    ];
    for (what, step) in steps {
        // Past the coarse clock tick of the last observation, so nothing is racy.
        std::thread::sleep(std::time::Duration::from_millis(20));
        step();
        let (walked, followed, filled) = if what.starts_with("copy") {
            (
                changes_of(&walking.snapshot_paths(&["data"]).unwrap()),
                changes_of(&following.snapshot_paths(&["data"]).unwrap()),
                changes_of(&filling.snapshot_paths(&["data"]).unwrap()),
            )
        } else {
            (
                changes_of(&walking.snapshot().unwrap()),
                changes_of(&following.snapshot().unwrap()),
                changes_of(&filling.snapshot().unwrap()),
            )
        };
        assert_eq!(followed, walked, "{what}");
        assert_eq!(filled, walked, "{what}, index filled from the lower view");
        // Proofs depend on when each snapshot ran (racy entries get one), not on the tree.
        let without_proof = |entry: Option<kiln_fs::snapshot::Entry>| {
            entry.map(|mut e| {
                e.proof = None;
                e
            })
        };
        for (path, _) in &walked {
            assert_eq!(
                without_proof(filling.entry(Path::new(path)).unwrap()),
                without_proof(walking.index().get(Path::new(path)).cloned()),
                "{what}: {path}"
            );
        }
        if what != "nothing" {
            assert!(!walked.is_empty(), "{what}: the step changed nothing");
        }
    }
    assert_eq!(
        following.index().len(),
        walking.index().len(),
        "both indexes describe the same tree"
    );
    assert!(
        filling.index().len() < walking.index().len(),
        "the lower view's index holds only what steps touched"
    );
}

//! The layer tree store's retention: a prune removes the trees nobody used for the cutoff and
//! never one a holder has (mounted, or being unpacked), and builds taking trees while prunes run
//! always get a whole tree. Run as root, as the store is (owners and modes as in the layer).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use kiln_fs::trees::{LayerTree, LayerTrees, TreePruneReport};
use kiln_oci::Digest;
use support::Layer;

/// A layer blob (plain tar) of `files` files under `data/`, each naming the layer.
struct Blob {
    path: PathBuf,
    digest: Digest,
    files: usize,
}

fn blob(dir: &Path, name: &str, files: usize) -> Blob {
    let mut layer = Layer::new().dir("data");
    for i in 0..files {
        layer = layer.file(&format!("data/{i}"), format!("{name} {i}").as_bytes());
    }
    let bytes = layer.tar();
    let path = dir.join(format!("{name}.tar"));
    std::fs::write(&path, &bytes).unwrap();
    Blob {
        path,
        digest: Digest::sha256_of(&bytes),
        files,
    }
}

fn take(store: &LayerTrees, blob: &Blob) -> LayerTree {
    store
        .get_or_unpack(&blob.digest, &blob.path, &blob.digest)
        .unwrap()
}

/// The entries of a store directory other than its own dot files.
fn trees_in(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    names
}

fn name_of(digest: &Digest) -> String {
    format!("sha256-{}", digest.hex())
}

fn removed(report: &TreePruneReport) -> Vec<Digest> {
    report.removed.iter().map(|t| t.diff_id.clone()).collect()
}

fn in_use(report: &TreePruneReport) -> Vec<Digest> {
    report.in_use.iter().map(|t| t.diff_id.clone()).collect()
}

/// Sets the last use of `blob`'s tree `ago` back, as a build that let go of it then would have.
fn used_ago(store: &LayerTrees, blob: &Blob, ago: Duration) {
    let stamp = store.dir().join(".stamps").join(name_of(&blob.digest));
    std::fs::File::options()
        .write(true)
        .open(&stamp)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

#[test]
fn a_prune_removes_unused_trees_and_keeps_the_ones_held() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerTrees::open(dir.path().join("layers")).unwrap();
    let blobs: Vec<Blob> = ["a", "b", "c"]
        .iter()
        .map(|name| blob(dir.path(), name, 20))
        .collect();
    let held = take(&store, &blobs[0]);
    drop(take(&store, &blobs[1]));
    drop(take(&store, &blobs[2]));
    assert_eq!(trees_in(store.dir()).len(), 3);

    let dry = store.prune(Duration::ZERO, true).unwrap();
    assert!(dry.dry_run);
    let mut expected = vec![blobs[1].digest.clone(), blobs[2].digest.clone()];
    expected.sort_by_key(|d| d.to_string());
    assert_eq!(removed(&dry), expected);
    assert!(dry.removed.iter().all(|t| t.bytes > 0), "{:?}", dry.removed);
    assert_eq!(in_use(&dry), vec![blobs[0].digest.clone()]);
    assert_eq!(
        trees_in(store.dir()).len(),
        3,
        "a dry run changed the store"
    );

    let report = store.prune(Duration::ZERO, false).unwrap();
    assert_eq!(removed(&report), expected);
    assert_eq!(in_use(&report), vec![blobs[0].digest.clone()]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(trees_in(store.dir()), [name_of(&blobs[0].digest)]);
    assert_eq!(
        std::fs::read_dir(held.path().join("data")).unwrap().count(),
        20,
        "the held tree was touched"
    );
    // Their stamps went with them; the held tree's stays.
    let stamps = trees_in(&store.dir().join(".stamps"));
    assert_eq!(stamps, [name_of(&blobs[0].digest)]);

    drop(held);
    let report = store.prune(Duration::ZERO, false).unwrap();
    assert_eq!(removed(&report), vec![blobs[0].digest.clone()]);
    assert!(report.in_use.is_empty());
    assert!(trees_in(store.dir()).is_empty());

    // A pruned layer asked for again is unpacked again, whole.
    let again = take(&store, &blobs[1]);
    assert_eq!(
        std::fs::read_to_string(again.path().join("data/7")).unwrap(),
        "b 7"
    );
}

#[test]
fn trees_used_within_the_cutoff_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerTrees::open(dir.path().join("layers")).unwrap();
    let old = blob(dir.path(), "old", 5);
    let recent = blob(dir.path(), "recent", 5);
    drop(take(&store, &old));
    drop(take(&store, &recent));
    used_ago(&store, &old, Duration::from_secs(3 * 3600));
    used_ago(&store, &recent, Duration::from_secs(30 * 60));

    let report = store.prune(Duration::from_secs(3600), false).unwrap();
    assert_eq!(removed(&report), vec![old.digest.clone()]);
    assert!(report.removed[0].unused_for >= Duration::from_secs(3 * 3600));
    assert_eq!(report.kept, 1);
    assert_eq!(trees_in(store.dir()), [name_of(&recent.digest)]);

    // Held for a long time, a tree is last used when it is let go, not when it was taken.
    let held = take(&store, &recent);
    used_ago(&store, &recent, Duration::from_secs(3 * 3600));
    let report = store.prune(Duration::from_secs(3600), false).unwrap();
    assert_eq!(in_use(&report), vec![recent.digest.clone()]);
    drop(held);
    let report = store.prune(Duration::from_secs(3600), false).unwrap();
    assert!(report.removed.is_empty() && report.kept == 1, "{report:?}");
}

#[test]
fn a_tree_without_a_stamp_is_aged_from_when_it_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerTrees::open(dir.path().join("layers")).unwrap();
    let layer = blob(dir.path(), "unstamped", 5);
    drop(take(&store, &layer));
    // As a kiln dir from before stamps has it.
    std::fs::remove_file(store.dir().join(".stamps").join(name_of(&layer.digest))).unwrap();

    let report = store.prune(Duration::from_secs(3600), false).unwrap();
    assert_eq!((report.kept, report.removed.len()), (1, 0), "{report:?}");
    let report = store.prune(Duration::ZERO, false).unwrap();
    assert_eq!(removed(&report), vec![layer.digest.clone()]);
}

#[test]
fn leftovers_of_stopped_unpacks_and_prunes_go_and_a_running_unpack_stays() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerTrees::open(dir.path().join("layers")).unwrap();
    let layer = blob(dir.path(), "layer", 5);
    let busy = blob(dir.path(), "busy", 5);
    let stopped_unpack = store
        .dir()
        .join(format!(".unpacking-4000000-0-{}", name_of(&layer.digest)));
    let stopped_prune = store
        .dir()
        .join(format!(".removing-4000000-{}", name_of(&layer.digest)));
    let running_unpack = store
        .dir()
        .join(format!(".unpacking-4000001-0-{}", name_of(&busy.digest)));
    for leftover in [&stopped_unpack, &stopped_prune, &running_unpack] {
        std::fs::create_dir_all(leftover.join("data/deep")).unwrap();
        std::fs::write(leftover.join("data/deep/file"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", leftover.join("data/escape")).unwrap();
    }
    // An unpack in progress holds its tree's stamp exclusively.
    let busy_stamp =
        std::fs::File::create(store.dir().join(".stamps").join(name_of(&busy.digest))).unwrap();
    busy_stamp.lock().unwrap();

    let dry = store.prune(Duration::ZERO, true).unwrap();
    assert_eq!(dry.leftovers, 2);
    assert!(stopped_unpack.exists() && stopped_prune.exists());

    let report = store.prune(Duration::ZERO, false).unwrap();
    assert_eq!(report.leftovers, 2, "{report:?}");
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(!stopped_unpack.exists() && !stopped_prune.exists());
    assert!(running_unpack.join("data/deep/file").exists());
    assert!(Path::new("/etc/passwd").exists(), "a symlink was followed");
}

/// Builds taking and letting go of trees on several threads while prunes with no cutoff run
/// in a loop: every tree a build holds is whole for as long as it holds it, and the prunes
/// remove trees between uses (so the builds also unpack them again).
#[test]
fn builds_and_prunes_at_once_never_lose_a_held_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerTrees::open(dir.path().join("layers")).unwrap();
    let blobs: Vec<Blob> = (0..3)
        .map(|i| blob(dir.path(), &format!("layer{i}"), 60))
        .collect();
    const BUILDS: usize = 3;
    let finished = AtomicUsize::new(0);
    let pruned = AtomicUsize::new(0);
    let in_use_seen = AtomicUsize::new(0);
    /// Counts a build as finished however it ends, so a build that panics stops the pruner
    /// too and the test fails instead of hanging.
    struct Finished<'a>(&'a AtomicUsize);
    impl Drop for Finished<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let pruner = s.spawn(|| {
            while finished.load(Ordering::Relaxed) < BUILDS {
                let report = store.prune(Duration::ZERO, false).unwrap();
                assert!(report.failed.is_empty(), "{:?}", report.failed);
                pruned.fetch_add(report.removed.len(), Ordering::Relaxed);
                in_use_seen.fetch_add(report.in_use.len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let builds: Vec<_> = (0..BUILDS)
            .map(|worker| {
                let (store, blobs, finished) = (&store, &blobs, &finished);
                s.spawn(move || {
                    let _finished = Finished(finished);
                    for round in 0..25 {
                        let blob = &blobs[(worker + round) % blobs.len()];
                        let tree = take(store, blob);
                        for _ in 0..3 {
                            let files =
                                std::fs::read_dir(tree.path().join("data")).unwrap().count();
                            assert_eq!(files, blob.files, "a held tree lost files");
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        drop(tree);
                        // Time for a prune to find the tree free.
                        std::thread::sleep(Duration::from_millis(4));
                    }
                })
            })
            .collect();
        let ended: Vec<_> = builds.into_iter().map(|b| b.join()).collect();
        pruner.join().unwrap();
        for build in ended {
            build.unwrap();
        }
    });
    assert!(
        pruned.load(Ordering::Relaxed) > 0,
        "no prune removed a tree"
    );
    assert!(
        in_use_seen.load(Ordering::Relaxed) > 0,
        "no prune found a tree in use"
    );
    let names: Vec<String> = std::fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".unpacking-") || n.starts_with(".removing-"))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

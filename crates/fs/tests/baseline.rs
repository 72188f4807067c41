//! The first snapshot of a stage costs no walk of its own: unpacking the Debian base with
//! kiln-fs fills the snapshot index, and a snapshot right after reports nothing, while a real
//! step's changes (and only those) come out, and the layer written from them applies cleanly.

use std::fs;
use std::path::Path;

use kiln_fs::resolve::Root;
use kiln_fs::snapshot::{ChangeKind, Index, SnapshotOptions, Snapshotter};
use kiln_fs::unpack::{unpack_layer, UnpackEvent, UnpackOptions};
use kiln_oci::Digest;

fn layers_of(layout: &Path) -> Vec<(Digest, Digest)> {
    let read = |digest: &str| {
        let d = Digest::parse(digest).unwrap();
        let bytes = fs::read(layout.join("blobs/sha256").join(d.hex())).unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let config = read(manifest["config"]["digest"].as_str().unwrap());
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(config["rootfs"]["diff_ids"].as_array().unwrap())
        .map(|(layer, diff_id)| {
            (
                Digest::parse(layer["digest"].as_str().unwrap()).unwrap(),
                Digest::parse(diff_id.as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn debian_base_unpacked_by_kiln_is_its_own_baseline() {
    let layout = kiln_testkit::bases::debian_layout();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    let root = Root::open(&rootfs).unwrap();
    let mut index = Index::new();
    for (digest, diff_id) in layers_of(layout) {
        let blob = fs::File::open(layout.join("blobs/sha256").join(digest.hex())).unwrap();
        let mut on_event = |event: UnpackEvent<'_>| index.observe(&event);
        let options = UnpackOptions {
            diff_id: Some(&diff_id),
            on_event: Some(&mut on_event),
        };
        unpack_layer(&root, blob, &digest, options).unwrap();
    }
    index.seal(&rootfs).unwrap();
    assert!(
        index.len() > 5000,
        "Debian has thousands of paths, index has {}",
        index.len()
    );

    let mut snapshotter = Snapshotter::new(&rootfs, index, &SnapshotOptions::default()).unwrap();
    let first = snapshotter.snapshot().unwrap();
    let spurious: Vec<_> = first.changes.iter().map(|c| (&c.path, c.kind)).collect();
    assert!(spurious.is_empty(), "nothing changed, yet: {spurious:?}");

    // A step: install a config file, edit one, remove a directory tree.
    fs::write(rootfs.join("etc/kiln.conf"), "x=1\n").unwrap();
    let motd = rootfs.join("etc/motd");
    let mut text = fs::read_to_string(&motd).unwrap_or_default();
    text.push_str("built by kiln\n");
    fs::write(&motd, text).unwrap();
    fs::remove_dir_all(rootfs.join("usr/share/doc")).unwrap();
    let diff = snapshotter.snapshot().unwrap();
    let top: Vec<(String, ChangeKind)> = diff
        .changes
        .iter()
        // Below the deleted tree every path is reported too; the layer writer folds them.
        .filter(|c| c.path == Path::new("usr/share/doc") || !c.path.starts_with("usr/share/doc"))
        .map(|c| (c.path.to_string_lossy().into_owned(), c.kind))
        .collect();
    assert_eq!(
        top,
        [
            ("etc".to_string(), ChangeKind::Modified),
            ("etc/kiln.conf".to_string(), ChangeKind::Added),
            ("etc/motd".to_string(), ChangeKind::Modified),
            ("usr/share".to_string(), ChangeKind::Modified),
            ("usr/share/doc".to_string(), ChangeKind::Deleted),
        ]
    );

    // The step's layer: one whiteout for the whole deleted tree, changed parents first.
    let tar_path = work.path().join("step.tar");
    let file = fs::File::create(&tar_path).unwrap();
    kiln_fs::layer::write_tar(&rootfs, &diff, file, None).unwrap();
    let listing = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&tar_path)
        .output()
        .unwrap();
    assert!(listing.status.success());
    let names = String::from_utf8(listing.stdout).unwrap();
    let names: Vec<&str> = names.lines().collect();
    assert_eq!(
        names,
        [
            "etc/",
            "etc/kiln.conf",
            "etc/motd",
            "usr/",
            "usr/share/",
            "usr/share/.wh.doc"
        ]
    );
}

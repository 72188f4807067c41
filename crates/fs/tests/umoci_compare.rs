//! kiln-fs unpack against umoci (run as root, not rootless): the same image unpacked by both
//! gives the same tree — paths, types, modes, owners, xattrs, link targets, hardlink structure,
//! content — and the same modification times.

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_fs::resolve::Root;
use kiln_fs::unpack::{unpack_layer, Compression, UnpackOptions};
use kiln_oci::Digest;
use kiln_testkit::tree::Tree;
use kiln_testkit::{bases, image, require_tools, run, Registry};
use serde_json::json;
use support::Layer;

/// The layers of the image tagged `tag` in an OCI layout: (blob path, digest, diffID).
fn layout_layers(layout: &Path, tag: &str) -> Vec<(PathBuf, Digest, Digest)> {
    let read_json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    };
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let index = read_json(layout.join("index.json"));
    let manifest_digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .expect("tag in index.json")["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let manifest = read_json(blob(&manifest_digest));
    let config = read_json(blob(manifest["config"]["digest"].as_str().unwrap()));
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            let digest = layer["digest"].as_str().unwrap();
            (
                blob(digest),
                Digest::parse(digest).unwrap(),
                Digest::parse(diff_id.as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// Unpacks every layer of the layout's image into `rootfs` with kiln-fs, streaming from the
/// blob files.
fn kiln_unpack(layout: &Path, tag: &str, rootfs: &Path) {
    std::fs::create_dir_all(rootfs).unwrap();
    let root = Root::open(rootfs).unwrap();
    for (blob, digest, diff_id) in layout_layers(layout, tag) {
        let report = unpack_layer(
            &root,
            File::open(&blob).unwrap(),
            &digest,
            UnpackOptions {
                diff_id: Some(&diff_id),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    }
}

fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle));
    bundle.join("rootfs")
}

/// Modification times of every path, for the comparison the tree scan leaves out.
fn mtimes(root: &Path) -> BTreeMap<PathBuf, (i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let meta = std::fs::symlink_metadata(root.join(&rel)).unwrap();
        if meta.is_dir() {
            for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
                stack.push(rel.join(entry.unwrap().file_name()));
            }
        }
        out.insert(rel, (meta.mtime(), meta.mtime_nsec()));
    }
    out
}

fn assert_same_tree(ours: &Path, theirs: &Path) {
    let ours_tree = Tree::scan(ours, &[]).unwrap();
    let theirs_tree = Tree::scan(theirs, &[]).unwrap();
    let diff = ours_tree.diff(&theirs_tree);
    assert!(diff.is_empty(), "kiln (left) vs umoci (right):\n{diff}");
    assert!(ours_tree.entries.len() > 1);
    let (ours_times, theirs_times) = (mtimes(ours), mtimes(theirs));
    let differing: Vec<_> = ours_times
        .iter()
        .filter(|(path, time)| theirs_times.get(*path) != Some(time))
        .map(|(path, time)| {
            format!(
                "{}: {time:?} vs {:?}",
                path.display(),
                theirs_times.get(path)
            )
        })
        .take(20)
        .collect();
    assert!(
        differing.is_empty(),
        "mtimes differ:\n{}",
        differing.join("\n")
    );
}

#[test]
fn debian_base_from_registry_matches_umoci() {
    require_tools(&["skopeo", "umoci"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::debian_rootfs(), "base/debian:bookworm");
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{}/base/debian:bookworm", registry.addr()))
        .arg(format!("oci:{}:img", layout.display())));
    let theirs = umoci_unpack(&layout, "img", &tmp.path().join("bundle"));
    let ours = tmp.path().join("kiln");
    kiln_unpack(&layout, "img", &ours);
    assert_same_tree(&ours, &theirs);
    assert!(ours.join("usr/bin/apt-get").is_file());
}

/// Writes a layout holding one image made of `layers` (gzip blobs) tagged `tag`.
fn write_layout(layout: &Path, tag: &str, layers: &[(Vec<u8>, Vec<u8>)]) {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> Digest {
        let digest = Digest::sha256_of(data);
        std::fs::write(blobs.join(digest.hex()), data).unwrap();
        digest
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, gz) in layers {
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": put(gz).to_string(),
            "size": gz.len(),
        }));
        diff_ids.push(Digest::sha256_of(tar).to_string());
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(&config).to_string(), "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(&manifest).to_string(), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

/// `security.capability` v2 granting CAP_NET_RAW (bit 13), permitted and effective.
const CAP_NET_RAW: [u8; 20] = [
    0x01, 0, 0, 0x02, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// Three layers exercising everything a runtime must get right, built with the tar crate.
fn layered_image() -> Vec<Layer> {
    let base = Layer::new()
        .dir("./")
        .dir("etc")
        .file("etc/hostname", b"base\n")
        .file("etc/keep", b"kept\n")
        .dir("opaque")
        .file("opaque/lower1", b"1")
        .dir("opaque/lowerdir")
        .file("opaque/lowerdir/deep", b"deep")
        .dir("opaque2")
        .file("opaque2/lower", b"lower")
        .dir("gone")
        .file("gone/file", b"gone")
        .file("becomes-dir", b"file")
        .dir("becomes-file")
        .file("becomes-file/child", b"child")
        .dir_owned("home", 0o755, 0, 0)
        .dir_owned("home/user", 0o700, 1000, 1000)
        .file_owned("home/user/.profile", b"PS1=$\n", 0o600, 1000, 1000)
        .dir_owned("tmp", 0o1777, 0, 0)
        .dir("usr")
        .dir("usr/bin")
        .file_owned("usr/bin/su", b"#!su", 0o4755, 0, 0)
        .file_owned("usr/bin/wall", b"#!wall", 0o2755, 0, 5)
        .pax_file(
            &[
                ("SCHILY.xattr.security.capability", &CAP_NET_RAW),
                ("SCHILY.xattr.user.origin", b"base layer"),
            ],
            "usr/bin/ping",
            b"#!ping",
            0o755,
        )
        .file("usr/bin/tool", b"tool v1")
        .hardlink("usr/bin/tool-alias", "usr/bin/tool")
        .hardlink("usr/bin/tool-abs", "/usr/bin/tool")
        .symlink("bin", "usr/bin")
        .symlink("etc/absolute", "/etc/hostname")
        .dir("dev")
        .node("dev/null", tar::EntryType::Char, 1, 3)
        .node("run-fifo", tar::EntryType::Fifo, 0, 0);
    let middle = Layer::new()
        .dir("etc")
        .file("etc/hostname", b"middle\n")
        .file("etc/.wh.keep", b"")
        .file(".wh.gone", b"")
        // Opaque marker first, then this layer's own entries.
        .dir("opaque")
        .file("opaque/.wh..wh..opq", b"")
        .file("opaque/upper", b"upper")
        // This layer's entries first, then the marker: they must survive it.
        .dir("opaque2")
        .file("opaque2/upper", b"upper2")
        .dir("opaque2/sub")
        .file("opaque2/.wh..wh..opq", b"")
        .dir("becomes-dir")
        .file("becomes-dir/child", b"now a dir")
        .file("becomes-file", b"now a file")
        // A hard link in this layer to a file of the lower layer.
        .hardlink("etc/hostname-of-tool", "usr/bin/tool");
    let top = Layer::new()
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/tool", b"tool v2")
        .symlink("etc/absolute", "/etc/keep-not-here")
        .dir("opaque")
        .file("opaque/.wh.upper", b"")
        .file("new-in-top", b"top");
    vec![base, middle, top]
}

#[test]
fn layers_with_whiteouts_opaque_dirs_and_links_match_umoci() {
    require_tools(&["umoci"]);
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let layers: Vec<_> = layered_image()
        .into_iter()
        .map(|layer| {
            let tar = layer.tar();
            let gz = support::gzip(&tar);
            (tar, gz)
        })
        .collect();
    write_layout(&layout, "img", &layers);
    let theirs = umoci_unpack(&layout, "img", &tmp.path().join("bundle"));
    let ours = tmp.path().join("kiln");
    kiln_unpack(&layout, "img", &ours);
    assert_same_tree(&ours, &theirs);
    // Spot checks that the comparison covered what it should.
    assert!(!ours.join("opaque/lower1").exists());
    assert!(!ours.join("opaque/upper").exists());
    assert!(ours.join("opaque2/upper").exists());
    assert!(!ours.join("opaque2/lower").exists());
    assert!(!ours.join("gone").exists());
    assert_eq!(
        std::fs::read(ours.join("etc/hostname-of-tool")).unwrap(),
        b"tool v1"
    );
    assert_eq!(
        std::fs::metadata(ours.join("usr/bin/su")).unwrap().mode() & 0o7777,
        0o4755
    );
    let tree = Tree::scan(&ours, &[]).unwrap();
    let ping = &tree.entries[Path::new("usr/bin/ping")];
    assert!(ping.xattrs.contains_key("security.capability"), "{ping:?}");
}

#[test]
fn gzip_zstd_and_plain_layers_unpack_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let mut trees = Vec::new();
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let dir = tmp.path().join(format!("{compression:?}"));
        std::fs::create_dir(&dir).unwrap();
        let root = Root::open(&dir).unwrap();
        for layer in layered_image() {
            let tar = layer.tar();
            let blob = match compression {
                Compression::None => tar.clone(),
                Compression::Gzip => support::gzip(&tar),
                Compression::Zstd => zstd::encode_all(&tar[..], 3).unwrap(),
            };
            let report = unpack_layer(
                &root,
                &blob[..],
                &Digest::sha256_of(&blob),
                UnpackOptions {
                    diff_id: Some(&Digest::sha256_of(&tar)),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(report.compression, compression);
            assert_eq!(report.uncompressed_size, tar.len() as u64);
        }
        trees.push(Tree::scan(&dir, &[]).unwrap());
    }
    assert!(
        trees[0].diff(&trees[1]).is_empty(),
        "{}",
        trees[0].diff(&trees[1])
    );
    assert!(
        trees[0].diff(&trees[2]).is_empty(),
        "{}",
        trees[0].diff(&trees[2])
    );
}

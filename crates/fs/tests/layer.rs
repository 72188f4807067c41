//! Layers written by kiln-fs, checked with real tools: `umoci unpack` must rebuild the source
//! tree exactly, `gzip -t` and `pigz -t` must accept the blobs, and the bytes must not depend on
//! the run or the number of threads.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_fs::blobstore::BlobStore;
use kiln_fs::compress::Compression;
use kiln_fs::layer::{write_layer, write_tar, LayerBlob, LayerOptions};
use kiln_fs::resolve::Root;
use kiln_fs::snapshot::{Diff, IgnoreOptions, Index, SnapshotOptions, Snapshotter};
use kiln_fs::unpack::{unpack_layer, UnpackOptions};
use kiln_oci::Digest;
use kiln_testkit::tree::Tree;

fn snapshot_options() -> SnapshotOptions {
    SnapshotOptions {
        ignore: IgnoreOptions {
            system_paths: false,
            var_run: false,
            ..IgnoreOptions::default()
        },
        ..SnapshotOptions::default()
    }
}

fn write(root: &Path, rel: &str, content: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn chmod(root: &Path, rel: &str, mode: u32) {
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every kind of entry a layer can carry, and the awkward cases of each.
fn rich_tree(root: &Path) {
    write(root, "etc/os-release", b"NAME=kiln\n");
    write(root, "etc/empty", b"");
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(root, "usr/lib/big.bin", &big);
    write(root, "usr/bin/suid", b"#!/bin/sh\n");
    chmod(root, "usr/bin/suid", 0o4755);
    fs::create_dir_all(root.join("tmp")).unwrap();
    chmod(root, "tmp", 0o1777);
    fs::create_dir_all(root.join("srv/shared")).unwrap();
    chmod(root, "srv/shared", 0o2775);
    write(root, "home/user/.profile", b"export A=1\n");
    std::os::unix::fs::lchown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::lchown(root.join("home/user/.profile"), Some(1000), Some(1000)).unwrap();
    write(root, "opt/huge-ids", b"ids beyond ustar's octal fields");
    std::os::unix::fs::lchown(root.join("opt/huge-ids"), Some(3_000_000), Some(4_000_000)).unwrap();
    symlink("os-release", root.join("etc/relative-link")).unwrap();
    symlink("/etc/os-release", root.join("etc/absolute-link")).unwrap();
    symlink("does/not/exist", root.join("etc/dangling")).unwrap();
    let long_target = format!("/{}", "t".repeat(150));
    symlink(&long_target, root.join("etc/long-target")).unwrap();
    let long_dir = format!("deep/{}/{}", "d".repeat(90), "e".repeat(90));
    write(root, &format!("{long_dir}/file-with-a-long-path"), b"long");
    let very_long = format!("deep/{}", "v".repeat(200));
    write(root, &very_long, b"pax path");
    write(root, "usr/bin/busybox", b"one inode, three names");
    fs::hard_link(root.join("usr/bin/busybox"), root.join("usr/bin/sh")).unwrap();
    fs::hard_link(root.join("usr/bin/busybox"), root.join("usr/bin/ls")).unwrap();
    fs::create_dir_all(root.join("dev-nodes")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("dev-nodes/null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("dev-nodes/loop0"),
        rustix::fs::FileType::BlockDevice,
        rustix::fs::Mode::from_raw_mode(0o660),
        rustix::fs::makedev(7, 0),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("dev-nodes/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(root.join("dev-nodes/socket")).unwrap();
    rustix::fs::lsetxattr(
        root.join("etc/os-release"),
        "user.origin",
        b"kiln\0binary",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        root.join("srv/shared"),
        "user.dir",
        b"x",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::lsetxattr(
        root.join("usr/bin/suid"),
        "security.capability",
        &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

fn all_added(root: &Path) -> (Snapshotter, Diff) {
    let mut s = Snapshotter::new(root, Index::new(), &snapshot_options()).unwrap();
    let diff = s.snapshot().unwrap();
    (s, diff)
}

fn gzip_options(threads: usize) -> LayerOptions {
    LayerOptions {
        compression: Compression::Gzip { level: 6 },
        threads,
        source_date_epoch: None,
    }
}

/// Writes an OCI layout (blobs from `store`'s directory, which has the layout's blob layout)
/// whose image has `layers` in order, tagged `latest`.
fn oci_layout(dir: &Path, layers: &[LayerBlob]) {
    let blob = |bytes: &[u8]| {
        let digest = Digest::sha256_of(bytes);
        fs::write(dir.join("blobs/sha256").join(digest.hex()), bytes).unwrap();
        (digest.to_string(), bytes.len())
    };
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = blob(&serde_json::to_vec(&config).unwrap());
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size}))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    });
    let (manifest_digest, manifest_size) = blob(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn umoci_unpack(layout: &Path, bundle: &Path) -> PathBuf {
    kiln_testkit::require_tools(&["umoci"]);
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:latest", layout.display()))
        .arg(bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle.join("rootfs")
}

fn assert_same_tree(expected: &Path, actual: &Path) {
    let a = Tree::scan(expected, &["dev-nodes/socket"]).unwrap();
    let b = Tree::scan(actual, &[]).unwrap();
    let diff = a.diff(&b);
    assert!(diff.is_empty(), "trees differ:\n{diff}");
}

#[test]
fn full_layer_unpacks_with_umoci_into_the_same_tree() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    rich_tree(&src);
    let (_, diff) = all_added(&src);
    let layout = work.path().join("layout");
    let store = BlobStore::open(&layout).unwrap();
    let layer = write_layer(&src, &diff, &store, &gzip_options(2)).unwrap();
    oci_layout(&layout, std::slice::from_ref(&layer));
    let rootfs = umoci_unpack(&layout, &work.path().join("bundle"));
    assert_same_tree(&src, &rootfs);
    // Whole-second mtimes survive the trip.
    for rel in ["usr/lib/big.bin", "etc", "home/user/.profile"] {
        let a = fs::symlink_metadata(src.join(rel)).unwrap();
        let b = fs::symlink_metadata(rootfs.join(rel)).unwrap();
        assert_eq!(a.mtime(), b.mtime(), "{rel}");
    }
}

#[test]
fn incremental_layers_with_whiteouts_and_opaque_dirs_unpack_with_umoci() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    rich_tree(&src);
    write(&src, "var/lib/tree/a/b/c", b"deep");
    write(&src, "var/lib/tree/x", b"x");
    write(&src, "var/cache/keep", b"k");
    write(&src, "var/cache/gone", b"g");
    write(&src, "recreate/old1", b"1");
    write(&src, "recreate/sub/old2", b"2");
    write(&src, "dir-to-file/child", b"c");
    write(&src, "file-to-dir", b"f");
    let (mut s, diff) = all_added(&src);
    let layout = work.path().join("layout");
    let store = BlobStore::open(&layout).unwrap();
    let base = write_layer(&src, &diff, &store, &gzip_options(2)).unwrap();

    // One step's worth of changes of every kind.
    fs::remove_dir_all(src.join("var/lib/tree")).unwrap();
    fs::remove_file(src.join("var/cache/gone")).unwrap();
    fs::remove_dir_all(src.join("recreate")).unwrap();
    write(&src, "recreate/new", b"n");
    fs::remove_dir_all(src.join("dir-to-file")).unwrap();
    write(&src, "dir-to-file", b"now a file");
    fs::remove_file(src.join("file-to-dir")).unwrap();
    write(&src, "file-to-dir/child", b"now a dir");
    chmod(&src, "etc/os-release", 0o600);
    std::os::unix::fs::lchown(src.join("etc/empty"), Some(7), Some(8)).unwrap();
    rustix::fs::lsetxattr(
        src.join("etc/os-release"),
        "user.second",
        b"2",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::remove_file(src.join("etc/relative-link")).unwrap();
    symlink("empty", src.join("etc/relative-link")).unwrap();
    fs::hard_link(src.join("etc/empty"), src.join("etc/empty-link")).unwrap();
    write(&src, "usr/lib/big.bin", b"rewritten");
    let diff = s.snapshot().unwrap();
    let step = write_layer(&src, &diff, &store, &gzip_options(2)).unwrap();

    let names = tar_names(&step);
    let whiteouts: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| n.contains(".wh."))
        .collect();
    assert_eq!(
        whiteouts,
        [
            "recreate/.wh..wh..opq",
            "var/cache/.wh.gone",
            "var/lib/.wh.tree"
        ],
        "one whiteout per deleted tree, an opaque marker for the recreated directory: {names:?}"
    );
    assert!(names.contains(&"etc/empty-link".to_string()));
    assert!(
        !names.iter().any(|n| n.starts_with("dir-to-file/")),
        "no whiteouts below a dir replaced by a file"
    );

    oci_layout(&layout, &[base, step]);
    let rootfs = umoci_unpack(&layout, &work.path().join("bundle"));
    assert_same_tree(&src, &rootfs);
}

#[test]
fn kiln_unpack_and_umoci_build_the_same_tree_and_unpack_fills_the_index() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    rich_tree(&src);
    write(&src, "var/lib/tree/a/b", b"deep");
    write(&src, "recreate/old", b"1");
    write(&src, "dir-to-file/child", b"c");
    let (mut s, diff) = all_added(&src);
    let layout = work.path().join("layout");
    let store = BlobStore::open(&layout).unwrap();
    let base = write_layer(&src, &diff, &store, &gzip_options(2)).unwrap();
    fs::remove_dir_all(src.join("var/lib/tree")).unwrap();
    fs::remove_dir_all(src.join("recreate")).unwrap();
    write(&src, "recreate/new", b"n");
    fs::remove_dir_all(src.join("dir-to-file")).unwrap();
    write(&src, "dir-to-file", b"file");
    fs::hard_link(src.join("etc/empty"), src.join("etc/empty-link")).unwrap();
    chmod(&src, "etc/os-release", 0o640);
    let diff = s.snapshot().unwrap();
    let step = write_layer(&src, &diff, &store, &gzip_options(2)).unwrap();

    // Kiln's own unpack, filling a snapshot index as it goes.
    let kiln_root = work.path().join("kiln-rootfs");
    fs::create_dir(&kiln_root).unwrap();
    let root = Root::open(&kiln_root).unwrap();
    let mut index = Index::new();
    for layer in [&base, &step] {
        let mut on_event = |event: kiln_fs::unpack::UnpackEvent<'_>| index.observe(&event);
        let options = UnpackOptions {
            diff_id: Some(&layer.diff_id),
            on_event: Some(&mut on_event),
        };
        unpack_layer(
            &root,
            fs::File::open(&layer.path).unwrap(),
            &layer.digest,
            options,
        )
        .unwrap();
    }
    index.seal(&kiln_root).unwrap();

    oci_layout(&layout, &[base, step]);
    let umoci_root = umoci_unpack(&layout, &work.path().join("bundle"));
    assert_same_tree(&src, &kiln_root);
    assert_same_tree(&src, &umoci_root);

    // The index the unpack recorded is a complete baseline: nothing spurious, real changes seen.
    let mut after = Snapshotter::new(&kiln_root, index, &snapshot_options()).unwrap();
    let spurious = after.snapshot().unwrap();
    assert!(
        spurious.is_empty(),
        "unpacked tree reported changes: {:?}",
        spurious
            .changes
            .iter()
            .map(|c| (&c.path, c.kind))
            .collect::<Vec<_>>()
    );
    fs::write(kiln_root.join("etc/os-release"), b"NAME=changed\n").unwrap();
    let diff = after.snapshot().unwrap();
    assert_eq!(
        diff.changes
            .iter()
            .map(|c| c.path.to_str().unwrap())
            .collect::<Vec<_>>(),
        ["etc/os-release"]
    );
}

#[test]
fn layers_are_byte_identical_across_runs_and_thread_counts_and_gzip_accepts_them() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    rich_tree(&src);
    let (_, diff) = all_added(&src);
    let store = BlobStore::open(work.path().join("store")).unwrap();
    let one = write_layer(&src, &diff, &store, &gzip_options(1)).unwrap();
    let two = write_layer(&src, &diff, &store, &gzip_options(2)).unwrap();
    let again = write_layer(&src, &diff, &store, &gzip_options(2)).unwrap();
    assert_eq!(one.digest, two.digest);
    assert_eq!(two.digest, again.digest);
    assert_eq!(one.diff_id, two.diff_id);
    // A second snapshotter over the same tree gives the same layer too.
    let (_, diff_again) = all_added(&src);
    let fresh = write_layer(&src, &diff_again, &store, &gzip_options(2)).unwrap();
    assert_eq!(fresh.digest, one.digest);
    for tool in ["gzip", "pigz"] {
        kiln_testkit::require_tools(&[tool]);
        let status = Command::new(tool)
            .arg("-t")
            .arg(&one.path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{tool} -t rejected {}",
            one.path.display()
        );
    }
    // The diffID is the digest of what gzip -d gives back.
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(&one.path)
        .output()
        .unwrap();
    assert_eq!(Digest::sha256_of(&out.stdout), one.diff_id);
    assert_eq!(out.stdout.len() as u64, one.uncompressed_size);

    let zstd = LayerOptions {
        compression: Compression::Zstd { level: 3 },
        threads: 1,
        source_date_epoch: None,
    };
    let z = write_layer(&src, &diff, &store, &zstd).unwrap();
    assert_eq!(z.diff_id, one.diff_id);
    assert_eq!(z.media_type, "application/vnd.oci.image.layer.v1.tar+zstd");
    let out = Command::new("zstd")
        .arg("-dc")
        .arg(&z.path)
        .output()
        .unwrap();
    assert_eq!(Digest::sha256_of(&out.stdout), z.diff_id);
}

#[test]
fn tar_is_sorted_parents_first_without_names_and_clamped_to_source_date_epoch() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    write(&src, "a/b/c", b"1");
    write(&src, "a.txt", b"2");
    write(&src, "a/-first", b"3");
    write(&src, "z", b"4");
    let mut s = Snapshotter::new(&src, Index::new(), &snapshot_options()).unwrap();
    s.rescan().unwrap();
    // Only a deep file changes: its unchanged parents still precede it.
    fs::write(src.join("a/b/c"), b"changed").unwrap();
    let diff = s.snapshot().unwrap();
    let tar = write_tar(&src, &diff, Vec::new(), Some(1_000_000_000)).unwrap();
    let headers = parse_headers(&tar);
    let names: Vec<&str> = headers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["a/", "a/b/", "a/b/c"]);
    for h in &headers {
        assert_eq!(h.mtime, 1_000_000_000, "{} clamped", h.name);
        assert!(h.uname.is_empty() && h.gname.is_empty());
    }
    // A full layer lists every directory before its content.
    let (_, diff) = all_added(&src);
    let tar = write_tar(&src, &diff, Vec::new(), None).unwrap();
    let names: Vec<String> = parse_headers(&tar).into_iter().map(|h| h.name).collect();
    assert_eq!(names, ["a/", "a/-first", "a/b/", "a/b/c", "a.txt", "z"]);
}

struct ParsedHeader {
    name: String,
    mtime: i64,
    uname: String,
    gname: String,
}

/// A minimal ustar reader (PAX headers skipped) to look at what the writer produced.
fn parse_headers(tar: &[u8]) -> Vec<ParsedHeader> {
    let field =
        |b: &[u8]| String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap()).into_owned();
    let octal = |b: &[u8]| i64::from_str_radix(field(b).trim(), 8).unwrap_or(0);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 512 <= tar.len() && tar[pos..pos + 512].iter().any(|b| *b != 0) {
        let h = &tar[pos..pos + 512];
        let size = octal(&h[124..136]) as usize;
        let prefix = field(&h[345..500]);
        let name = field(&h[0..100]);
        if h[156] != b'x' {
            out.push(ParsedHeader {
                name: if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                },
                mtime: octal(&h[136..148]),
                uname: field(&h[265..297]),
                gname: field(&h[297..329]),
            });
        }
        pos += 512 + size.div_ceil(512) * 512;
    }
    out
}

fn tar_names(layer: &LayerBlob) -> Vec<String> {
    let out = Command::new("tar")
        .arg("-tzf")
        .arg(&layer.path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -t failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

//! Unit tests of layer application on small layers built in memory.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_oci::Digest;

use super::*;
use crate::resolve::Root;

/// Builds a tar from `(path, kind)` pairs; kind: `"dir"`, `"file:CONTENT"`, `"link:TARGET"`.
fn tar_of(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o755);
        header.set_mtime(1_600_000_000);
        if *kind == "dir" {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, path, &[][..]).unwrap();
        } else if let Some(content) = kind.strip_prefix("file:") {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(content.len() as u64);
            builder
                .append_data(&mut header, path, content.as_bytes())
                .unwrap();
        } else if let Some(target) = kind.strip_prefix("link:") {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, path, target).unwrap();
        }
    }
    builder.into_inner().unwrap()
}

fn unpack(root: &Root, blob: &[u8]) -> Result<UnpackReport, UnpackError> {
    unpack_layer(
        root,
        blob,
        &Digest::sha256_of(blob),
        UnpackOptions::default(),
    )
}

#[test]
fn whiteouts_and_opaque_dirs_follow_the_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::open(tmp.path()).unwrap();
    let lower = tar_of(&[
        ("a", "dir"),
        ("a/old", "file:old"),
        ("a/sub", "dir"),
        ("a/sub/deep", "file:deep"),
        ("gone", "file:x"),
        ("keep", "file:k"),
    ]);
    unpack(&root, &lower).unwrap();
    // The opaque marker comes after an entry of the same layer in the same directory: that
    // entry stays, lower ones go, also below a directory this layer re-creates.
    let upper = tar_of(&[
        ("a", "dir"),
        ("a/new", "file:new"),
        ("a/sub", "dir"),
        ("a/.wh..wh..opq", "file:"),
        (".wh.gone", "file:"),
    ]);
    let mut events = Vec::new();
    let mut on_event = |e: UnpackEvent<'_>| match e {
        UnpackEvent::Removed { path } => events.push(format!("-{}", path.display())),
        UnpackEvent::Written { path, .. } => events.push(format!("+{}", path.display())),
    };
    let report = unpack_layer(
        &root,
        &upper[..],
        &Digest::sha256_of(&upper),
        UnpackOptions {
            on_event: Some(&mut on_event),
            ..Default::default()
        },
    )
    .unwrap();
    let p = tmp.path();
    assert!(p.join("a/new").exists());
    assert!(p.join("a/sub").is_dir());
    assert!(!p.join("a/sub/deep").exists());
    assert!(!p.join("a/old").exists());
    assert!(!p.join("gone").exists());
    assert!(p.join("keep").exists());
    assert_eq!(report.entries, 5);
    for expected in ["-a/old", "-a/sub/deep", "-gone", "+a/new", "+a", "+a/sub"] {
        assert!(
            events.iter().any(|e| e == expected),
            "{expected} in {events:?}"
        );
    }
}

#[test]
fn types_replace_each_other_and_dir_times_are_set_last() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::open(tmp.path()).unwrap();
    unpack(
        &root,
        &tar_of(&[("d", "dir"), ("d/f", "file:1"), ("f", "file:2")]),
    )
    .unwrap();
    unpack(
        &root,
        &tar_of(&[("d", "file:now a file"), ("f", "dir"), ("f/x", "file:3")]),
    )
    .unwrap();
    let p = tmp.path();
    assert_eq!(std::fs::read(p.join("d")).unwrap(), b"now a file");
    assert!(p.join("f").is_dir());
    assert_eq!(
        std::fs::metadata(p.join("f")).unwrap().mtime(),
        1_600_000_000
    );
}

#[test]
fn digest_mismatch_is_reported_after_reading_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::open(tmp.path()).unwrap();
    let blob = tar_of(&[("x", "file:x")]);
    let wrong = Digest::sha256_of(b"something else");
    let err = unpack_layer(&root, &blob[..], &wrong, UnpackOptions::default()).unwrap_err();
    match err {
        UnpackError::DigestMismatch {
            expected,
            actual,
            size,
        } => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, Digest::sha256_of(&blob));
            assert_eq!(size, blob.len() as u64);
        }
        other => panic!("unexpected {other}"),
    }
    assert!(
        Path::new(&tmp.path().join("x")).exists(),
        "applied while streaming"
    );
}

#[test]
fn a_refused_entry_stops_reading_the_stream() {
    struct Counting<'a> {
        data: &'a [u8],
        read: &'a std::cell::Cell<usize>,
    }
    impl std::io::Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.data.read(buf)?;
            self.read.set(self.read.get() + n);
            Ok(n)
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..5].copy_from_slice(b"../x\0");
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(0);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    builder.append(&header, &[][..]).unwrap();
    let mut big = tar::Header::new_gnu();
    big.set_size(8 << 20);
    big.set_mode(0o644);
    big.set_cksum();
    builder
        .append_data(&mut big, "big", &vec![0u8; 8 << 20][..])
        .unwrap();
    let blob = builder.into_inner().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::open(tmp.path()).unwrap();
    let read = std::cell::Cell::new(0);
    let err = unpack_layer(
        &root,
        Counting {
            data: &blob,
            read: &read,
        },
        &Digest::sha256_of(&blob),
        UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::InvalidEntry { .. }), "{err}");
    assert!(read.get() < 1 << 20, "read {} bytes", read.get());
}

#[test]
fn skipped_paths_are_neither_written_nor_whited_out() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    std::fs::create_dir_all(p.join("etc")).unwrap();
    std::fs::write(p.join("etc/hosts"), "the runtime's").unwrap();
    std::fs::create_dir_all(p.join("kiln")).unwrap();
    std::fs::write(p.join("kiln/executor"), "binary").unwrap();
    let root = Root::open(p).unwrap();
    let layer = tar_of(&[
        ("etc", "dir"),
        ("etc/hosts", "file:the image's"),
        ("etc/passwd", "file:root"),
        ("kiln/.wh..wh..opq", "file:"),
        (".wh.kiln", "file:"),
        ("kiln/executor", "file:replaced"),
    ]);
    let skip = |rel: &Path| rel == Path::new("etc/hosts") || rel.starts_with("kiln");
    unpack_layer_except(
        &root,
        &layer[..],
        &Digest::sha256_of(&layer),
        UnpackOptions::default(),
        Some(&skip),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(p.join("etc/passwd")).unwrap(),
        "root"
    );
    assert_eq!(
        std::fs::read_to_string(p.join("etc/hosts")).unwrap(),
        "the runtime's"
    );
    assert_eq!(
        std::fs::read_to_string(p.join("kiln/executor")).unwrap(),
        "binary"
    );
}

/// Files are written by worker threads while later entries are applied: entries that touch a
/// queued path (the same name again, a hard link to it, a type change of its directory) must
/// still see the layer in order, and every written file must be reported.
#[test]
fn queued_file_writes_keep_entry_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::open(tmp.path()).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, content: &[u8], link: Option<&str>| {
        let mut header = tar::Header::new_gnu();
        header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        header.set_mtime(1_600_000_000);
        header.set_entry_type(kind);
        header.set_size(content.len() as u64);
        match link {
            Some(target) => builder.append_link(&mut header, path, target).unwrap(),
            None => builder.append_data(&mut header, path, content).unwrap(),
        }
    };
    add("d", tar::EntryType::Directory, b"", None);
    for i in 0..300 {
        add(
            &format!("d/f{i}"),
            tar::EntryType::Regular,
            format!("first {i}").as_bytes(),
            None,
        );
    }
    add("d/f5", tar::EntryType::Regular, b"second", None);
    add("hl", tar::EntryType::Link, b"", Some("d/f7"));
    add("r", tar::EntryType::Directory, b"", None);
    for i in 0..100 {
        add(&format!("r/x{i}"), tar::EntryType::Regular, b"x", None);
    }
    add("r", tar::EntryType::Symlink, b"", Some("d"));
    add("s", tar::EntryType::Regular, b"file first", None);
    add("s", tar::EntryType::Directory, b"", None);
    add("s/in", tar::EntryType::Regular, b"inside", None);
    add("l", tar::EntryType::Symlink, b"", Some("d/f1"));
    add("l", tar::EntryType::Regular, b"no longer a link", None);
    add("l2", tar::EntryType::Symlink, b"", Some("d/f2"));
    let blob = builder.into_inner().unwrap();

    let mut written = std::collections::BTreeSet::new();
    let mut on_event = |e: UnpackEvent<'_>| {
        if let UnpackEvent::Written { path, metadata } = e {
            if metadata.is_file() {
                written.insert(path.to_path_buf());
            }
        }
    };
    unpack_layer(
        &root,
        &blob[..],
        &Digest::sha256_of(&blob),
        UnpackOptions {
            on_event: Some(&mut on_event),
            ..UnpackOptions::default()
        },
    )
    .unwrap();

    let at = |p: &str| tmp.path().join(p);
    assert_eq!(std::fs::read_to_string(at("d/f5")).unwrap(), "second");
    assert_eq!(std::fs::read_to_string(at("d/f299")).unwrap(), "first 299");
    let (linked, target) = (at("hl").metadata().unwrap(), at("d/f7").metadata().unwrap());
    assert_eq!(linked.ino(), target.ino());
    assert_eq!(target.nlink(), 2);
    assert_eq!(std::fs::read_link(at("r")).unwrap(), Path::new("d"));
    assert_eq!(std::fs::read_to_string(at("s/in")).unwrap(), "inside");
    assert_eq!(at("d/f1").metadata().unwrap().mode() & 0o7777, 0o644);
    assert_eq!(at("d/f1").metadata().unwrap().mtime(), 1_600_000_000);
    for i in 0..300 {
        assert!(
            written.contains(Path::new(&format!("d/f{i}"))),
            "d/f{i} not reported"
        );
    }
    assert!(written.contains(Path::new("s/in")) && written.contains(Path::new("hl")));
    assert_eq!(
        std::fs::read_to_string(at("l")).unwrap(),
        "no longer a link"
    );
    assert_eq!(std::fs::read_link(at("l2")).unwrap(), Path::new("d/f2"));
    assert_eq!(at("l2").symlink_metadata().unwrap().mtime(), 1_600_000_000);
}

#[test]
fn a_queued_file_in_the_way_of_a_later_entry_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Root::open(tmp.path()).unwrap();
    let mut entries: Vec<(String, String)> = (0..50)
        .map(|i| (format!("f{i}"), "file:x".to_owned()))
        .collect();
    entries.push(("f49/inside".to_owned(), "file:y".to_owned()));
    let entries: Vec<(&str, &str)> = entries
        .iter()
        .map(|(p, k)| (p.as_str(), k.as_str()))
        .collect();
    let err = unpack(&root, &tar_of(&entries)).unwrap_err().to_string();
    assert!(err.contains("f49/inside"), "{err}");
    assert!(
        tmp.path().join("f49").is_file(),
        "no directory replaced the file"
    );
}

//! A corpus of hostile layers. Each is either rejected (an error naming the layer and the entry)
//! or contained (written inside the root only), and the canary files next to the root are never
//! touched. Every case runs with both resolvers: the kernel's `openat2` and the user-space walk.

mod support;

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use kiln_fs::resolve::{Root, RootError, Strategy};
use kiln_fs::unpack::{unpack_layer, UnpackError, UnpackOptions, UnpackReport};
use kiln_oci::Digest;
use support::Layer;

const CANARY: &[u8] = b"canary: must never change";
const CANARY_MTIME: u64 = 1_000_000_000;

/// A temp dir holding `root/` (the rootfs under attack), a canary file `canary` and a canary
/// directory `outside/` with `outside/file` beside it.
struct Sandbox {
    tmp: tempfile::TempDir,
    strategy: Strategy,
}

impl Sandbox {
    fn new(strategy: Strategy) -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("root")).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        for canary in ["canary", "outside/file"] {
            let path = tmp.path().join(canary);
            std::fs::write(&path, CANARY).unwrap();
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(CANARY_MTIME))
                .unwrap();
        }
        Sandbox { tmp, strategy }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn root_dir(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    /// Absolute path of the canary file, as an attacker who knows the host layout would use it.
    fn canary(&self) -> String {
        self.dir().join("canary").to_str().unwrap().to_owned()
    }

    fn outside(&self) -> String {
        self.dir().join("outside").to_str().unwrap().to_owned()
    }

    fn unpack(&self, blob: &[u8]) -> Result<UnpackReport, UnpackError> {
        self.unpack_as(blob, &Digest::sha256_of(blob))
    }

    fn unpack_as(&self, blob: &[u8], digest: &Digest) -> Result<UnpackReport, UnpackError> {
        let root = Root::open_with(self.root_dir(), self.strategy).unwrap();
        unpack_layer(&root, blob, digest, UnpackOptions::default())
    }

    /// Nothing outside `root/` changed: same names, contents, mtimes, link counts.
    fn assert_outside_untouched(&self) {
        let mut names: Vec<_> = std::fs::read_dir(self.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["canary", "outside", "root"], "{:?}", self.strategy);
        let outside: Vec<_> = std::fs::read_dir(self.dir().join("outside"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside, ["file"], "{:?}", self.strategy);
        for canary in ["canary", "outside/file"] {
            let path = self.dir().join(canary);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert!(meta.is_file(), "{canary} replaced");
            assert_eq!(std::fs::read(&path).unwrap(), CANARY, "{canary} written");
            assert_eq!(meta.mtime() as u64, CANARY_MTIME, "{canary} touched");
            assert_eq!(meta.nlink(), 1, "{canary} hard-linked from the layer");
            assert_eq!(meta.mode() & 0o7777, 0o644 & !umask(), "{canary} chmod");
        }
    }
}

fn umask() -> u32 {
    // Read without changing: set and restore.
    let old = unsafe { libc::umask(0o022) };
    unsafe { libc::umask(old) };
    old
}

/// Runs `case` with each available resolver.
fn each_strategy(case: impl Fn(&Sandbox)) {
    let mut strategies = vec![Strategy::Walk];
    if Strategy::detect() == Strategy::Openat2 {
        strategies.push(Strategy::Openat2);
    }
    for strategy in strategies {
        let sandbox = Sandbox::new(strategy);
        case(&sandbox);
        sandbox.assert_outside_untouched();
    }
}

/// Asserts `result` is an [`UnpackError::InvalidEntry`] naming `entry` and the layer digest.
fn assert_invalid(result: Result<UnpackReport, UnpackError>, blob: &[u8], entry: &str) {
    let err = result.expect_err("hostile layer accepted");
    let message = err.to_string();
    assert!(
        matches!(err, UnpackError::InvalidEntry { .. }),
        "expected an invalid-entry error, got {message}"
    );
    assert!(
        message.contains(&Digest::sha256_of(blob).to_string()),
        "{message}"
    );
    assert!(message.contains(entry), "{message}");
}

#[test]
fn dotdot_traversal_is_rejected() {
    each_strategy(|s| {
        let blob = Layer::new().file("../canary", b"pwned").tar();
        assert_invalid(s.unpack(&blob), &blob, "../canary");
        let blob = Layer::new()
            .dir("a")
            .file("a/../../outside/file", b"pwned")
            .gzip();
        assert_invalid(s.unpack(&blob), &blob, "a/../../outside/file");
    });
}

#[test]
fn absolute_names_are_contained() {
    each_strategy(|s| {
        let name = s.canary();
        let blob = Layer::new().file(&name, b"contained").tar();
        s.unpack(&blob).unwrap();
        let inside = s.root_dir().join(name.trim_start_matches('/'));
        assert_eq!(std::fs::read(inside).unwrap(), b"contained");
    });
}

#[test]
fn file_entry_replaces_a_symlink_instead_of_writing_through_it() {
    each_strategy(|s| {
        let blob = Layer::new()
            .symlink("rel", "../canary")
            .symlink("abs", &s.canary())
            .file("rel", b"pwned")
            .file("abs", b"pwned")
            .tar();
        s.unpack(&blob).unwrap();
        for name in ["rel", "abs"] {
            let path = s.root_dir().join(name);
            assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
            assert_eq!(std::fs::read(path).unwrap(), b"pwned");
        }
    });
}

#[test]
fn symlink_to_root_then_file_under_it_lands_inside() {
    each_strategy(|s| {
        let blob = Layer::new()
            .symlink("slash", "/")
            .symlink("up", "../../..")
            .file("slash/canary", b"via slash")
            .file("up/outside-file", b"via up")
            .tar();
        s.unpack(&blob).unwrap();
        assert_eq!(
            std::fs::read(s.root_dir().join("canary")).unwrap(),
            b"via slash"
        );
        assert_eq!(
            std::fs::read(s.root_dir().join("outside-file")).unwrap(),
            b"via up"
        );
    });
}

#[test]
fn symlink_to_outside_dir_then_write_under_it_is_contained() {
    each_strategy(|s| {
        let outside = s.outside();
        let blob = Layer::new()
            .symlink("d", &outside)
            .symlink("r", "../outside")
            .file("d/file", b"pwned abs")
            .file("r/file", b"pwned rel")
            .tar();
        s.unpack(&blob).unwrap();
        let abs_inside = s
            .root_dir()
            .join(outside.trim_start_matches('/'))
            .join("file");
        assert_eq!(std::fs::read(abs_inside).unwrap(), b"pwned abs");
        assert_eq!(
            std::fs::read(s.root_dir().join("outside/file")).unwrap(),
            b"pwned rel"
        );
    });
}

#[test]
fn directory_replaced_by_symlink_to_outside_then_write_is_contained() {
    each_strategy(|s| {
        let lower = Layer::new().dir("etc").file("etc/conf", b"lower").tar();
        s.unpack(&lower).unwrap();
        let outside = s.outside();
        let upper = Layer::new()
            .symlink("etc", &outside)
            .file("etc/file", b"pwned")
            .tar();
        s.unpack(&upper).unwrap();
        assert!(std::fs::symlink_metadata(s.root_dir().join("etc"))
            .unwrap()
            .file_type()
            .is_symlink());
        let landed = s
            .root_dir()
            .join(outside.trim_start_matches('/'))
            .join("file");
        assert_eq!(std::fs::read(landed).unwrap(), b"pwned");
    });
}

#[test]
fn hardlink_to_absolute_outside_path_is_contained() {
    each_strategy(|s| {
        // Resolved inside the root, where that path does not exist: the unpack fails on the
        // missing target and nothing outside gains a link.
        let canary = s.canary();
        let blob = Layer::new().hardlink("link", &canary).tar();
        let err = s.unpack(&blob).unwrap_err();
        assert!(matches!(err, UnpackError::Apply { .. }), "{err}");
        assert!(err.to_string().contains("link"), "{err}");
        // With a file of that name inside the root, the link goes to that file.
        let blob = Layer::new()
            .file(&canary, b"inside")
            .hardlink("link", &canary)
            .tar();
        s.unpack(&blob).unwrap();
        assert_eq!(std::fs::read(s.root_dir().join("link")).unwrap(), b"inside");
    });
}

#[test]
fn hardlink_with_relative_escape_is_rejected() {
    each_strategy(|s| {
        let blob = Layer::new().hardlink("link", "../canary").tar();
        assert_invalid(s.unpack(&blob), &blob, "link");
        let blob = Layer::new()
            .dir("a")
            .hardlink("a/link", "a/../../outside/file")
            .tar();
        assert_invalid(s.unpack(&blob), &blob, "a/link");
    });
}

#[test]
fn hardlink_through_a_symlink_to_outside_is_contained() {
    each_strategy(|s| {
        let blob = Layer::new()
            .symlink("out", &s.outside())
            .hardlink("link", "out/file")
            .tar();
        assert!(matches!(
            s.unpack(&blob).unwrap_err(),
            UnpackError::Apply { .. }
        ));
        assert!(!s.root_dir().join("link").exists());
    });
}

#[test]
fn hardlink_to_a_directory_is_rejected() {
    each_strategy(|s| {
        let blob = Layer::new().dir("d").hardlink("link", "d").tar();
        assert_invalid(s.unpack(&blob), &blob, "link");
    });
}

#[test]
fn whiteout_of_dotdot_is_rejected() {
    each_strategy(|s| {
        let blob = Layer::new().file(".wh...", b"").tar();
        assert_invalid(s.unpack(&blob), &blob, ".wh...");
        let blob = Layer::new().dir("a").file("a/.wh...", b"").tar();
        assert_invalid(s.unpack(&blob), &blob, "a/.wh...");
        let blob = Layer::new().file("../.wh.canary", b"").tar();
        assert_invalid(s.unpack(&blob), &blob, "../.wh.canary");
    });
}

#[test]
fn whiteout_through_a_symlink_stays_inside() {
    each_strategy(|s| {
        let lower = Layer::new().dir("etc").file("etc/canary", b"inside").tar();
        s.unpack(&lower).unwrap();
        let upper = Layer::new()
            .symlink("abs", s.dir().to_str().unwrap())
            .symlink("rel", "../..")
            .file("abs/.wh.canary", b"")
            .file("rel/.wh.outside", b"")
            .file("rel/etc/.wh.canary", b"")
            .tar();
        s.unpack(&upper).unwrap();
        // "rel/etc" is root/etc: its lower file is whited out, as it would be in a runtime.
        assert!(!s.root_dir().join("etc/canary").exists());
    });
}

#[test]
fn opaque_whiteout_through_a_symlink_stays_inside() {
    each_strategy(|s| {
        let blob = Layer::new()
            .symlink("out", &s.outside())
            .symlink("up", "..")
            .file("out/.wh..wh..opq", b"")
            .file("up/.wh..wh..opq", b"")
            .tar();
        s.unpack(&blob).unwrap();
    });
}

#[test]
fn symlink_loops_fail_with_a_loop_error() {
    each_strategy(|s| {
        let blob = Layer::new()
            .symlink("a", "b")
            .symlink("b", "a")
            .file("a/x", b"x")
            .tar();
        match s.unpack(&blob).unwrap_err() {
            UnpackError::Apply { source, entry, .. }
                if matches!(*source, RootError::SymlinkLoop { .. }) =>
            {
                assert_eq!(entry, "a/x")
            }
            other => panic!("expected a symlink loop error, got {other}"),
        }
        let blob = Layer::new()
            .symlink("self", "self/self")
            .file("self/x", b"x")
            .tar();
        assert!(s.unpack(&blob).is_err());
    });
}

#[test]
fn truncated_gzip_fails() {
    each_strategy(|s| {
        let full = Layer::new()
            .file("big", &vec![7u8; 1 << 20])
            .file("after", b"x")
            .gzip();
        let cut = &full[..full.len() / 2];
        // Digest of the truncated bytes, so only the truncation itself can fail the unpack.
        let err = s.unpack_as(cut, &Digest::sha256_of(cut)).unwrap_err();
        assert!(matches!(err, UnpackError::Stream { .. }), "{err}");
    });
}

#[test]
fn truncated_tar_inside_file_data_fails() {
    each_strategy(|s| {
        let full = Layer::new().file("big", &vec![7u8; 100_000]).tar();
        let cut = &full[..50_000];
        let err = s.unpack_as(cut, &Digest::sha256_of(cut)).unwrap_err();
        assert!(matches!(err, UnpackError::Stream { .. }), "{err}");
        assert!(err.to_string().contains("big"), "{err}");
    });
}

#[test]
fn wrong_digest_fails_after_the_whole_stream() {
    each_strategy(|s| {
        let blob = Layer::new().file("f", b"content").gzip();
        let mut tampered = blob.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0xff; // corrupts the gzip trailer (the size field)
        let err = s
            .unpack_as(&tampered, &Digest::sha256_of(&blob))
            .unwrap_err();
        match err {
            UnpackError::DigestMismatch { expected, .. } => {
                assert_eq!(expected, Digest::sha256_of(&blob))
            }
            other => panic!("expected a digest mismatch, got {other}"),
        }
        // A well-formed but different layer under another layer's digest.
        let other = Layer::new().file("f", b"other").gzip();
        let err = s.unpack_as(&other, &Digest::sha256_of(&blob)).unwrap_err();
        assert!(matches!(err, UnpackError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("discarded"), "{err}");
    });
}

#[test]
fn diff_id_mismatch_fails() {
    each_strategy(|s| {
        let layer = Layer::new().file("f", b"content");
        let blob = layer.gzip();
        let root = Root::open_with(s.root_dir(), s.strategy).unwrap();
        let wrong = Digest::sha256_of(b"not the tar");
        let err = unpack_layer(
            &root,
            &blob[..],
            &Digest::sha256_of(&blob),
            UnpackOptions {
                diff_id: Some(&wrong),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
    });
}

#[test]
fn huge_declared_size_does_not_allocate_and_fails() {
    each_strategy(|s| {
        let mut header = tar::Header::new_gnu();
        header.set_path("huge").unwrap();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(1 << 50); // 1 PiB declared, 4 KiB present
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        let mut blob = header.as_bytes().to_vec();
        blob.extend_from_slice(&[1u8; 4096]);
        let before = peak_rss_kib();
        let err = s.unpack(&blob).unwrap_err();
        assert!(matches!(err, UnpackError::Stream { .. }), "{err}");
        assert!(
            peak_rss_kib() < before + 64 * 1024,
            "peak RSS grew by more than 64 MiB"
        );
        // A huge PAX header is refused as truncated, not buffered.
        let mut pax = tar::Header::new_gnu();
        pax.set_path("././@PaxHeader").unwrap();
        pax.set_entry_type(tar::EntryType::XHeader);
        pax.set_size(1 << 50);
        pax.set_mode(0o644);
        pax.set_mtime(0);
        pax.set_uid(0);
        pax.set_gid(0);
        pax.set_cksum();
        let mut blob = pax.as_bytes().to_vec();
        blob.extend_from_slice(&[b'9'; 4096]);
        assert!(s.unpack(&blob).is_err());
    });
}

#[test]
fn nul_in_name_is_rejected() {
    each_strategy(|s| {
        let blob = Layer::new()
            .pax_file(&[("path", b"evil\0name")], "placeholder", b"x", 0o644)
            .tar();
        assert_invalid(s.unpack(&blob), &blob, "evil\\0name");
    });
}

#[test]
fn empty_name_is_rejected() {
    each_strategy(|s| {
        let mut layer = Layer::new();
        layer.raw(b"", tar::EntryType::Regular, b"x", b"", 0o644);
        let blob = layer.tar();
        assert_invalid(s.unpack(&blob), &blob, "\"\"");
    });
}

#[test]
fn long_pax_names_with_traversal_are_rejected() {
    each_strategy(|s| {
        let name = format!("{}/../../../canary", "a/".repeat(60).trim_end_matches('/'));
        let name = name.replacen("a/", "../", 1);
        let blob = Layer::new()
            .pax_file(&[("path", name.as_bytes())], "placeholder", b"x", 0o644)
            .tar();
        let err = s.unpack(&blob).unwrap_err();
        assert!(matches!(err, UnpackError::InvalidEntry { .. }), "{err}");
    });
}

#[test]
fn device_node_without_cap_mknod_is_skipped_with_a_warning() {
    each_strategy(|s| {
        let blob = Layer::new()
            .node("dev/null", tar::EntryType::Char, 1, 3)
            .node("dev/loop9", tar::EntryType::Block, 7, 9)
            .node("fifo", tar::EntryType::Fifo, 0, 0)
            .tar();
        let report = {
            let _guard = DropCapMknod::new();
            s.unpack(&blob).unwrap()
        };
        let skipped: Vec<_> = report.skipped.iter().map(|e| e.path.clone()).collect();
        assert_eq!(
            skipped,
            [PathBuf::from("dev/null"), PathBuf::from("dev/loop9")]
        );
        assert!(report.skipped[0].reason.contains("character device 1:3"));
        assert!(std::fs::symlink_metadata(s.root_dir().join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(!s.root_dir().join("dev/null").exists());
    });
}

#[test]
fn device_nodes_are_created_when_permitted() {
    if !has_cap_mknod() {
        eprintln!("skipping: no CAP_MKNOD");
        return;
    }
    each_strategy(|s| {
        let blob = Layer::new()
            .node("dev/null", tar::EntryType::Char, 1, 3)
            .tar();
        let report = s.unpack(&blob).unwrap();
        assert!(report.skipped.is_empty());
        let meta = std::fs::symlink_metadata(s.root_dir().join("dev/null")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!(meta.rdev(), libc::makedev(1, 3));
        assert_eq!(meta.mode() & 0o7777, 0o640);
    });
}

fn peak_rss_kib() -> i64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss
}

const CAP_MKNOD: u32 = 27;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> [CapData; 2] {
    let mut header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    data
}

fn capset(data: &[CapData; 2]) {
    let mut header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

fn has_cap_mknod() -> bool {
    capget()[0].effective & (1 << CAP_MKNOD) != 0
}

/// Removes CAP_MKNOD from this thread's effective set (capabilities are per thread, so other
/// tests running in parallel keep theirs) and puts it back on drop.
struct DropCapMknod {
    saved: [CapData; 2],
}

impl DropCapMknod {
    fn new() -> Self {
        let saved = capget();
        let mut reduced = saved;
        reduced[0].effective &= !(1 << CAP_MKNOD);
        capset(&reduced);
        DropCapMknod { saved }
    }
}

impl Drop for DropCapMknod {
    fn drop(&mut self) {
        capset(&self.saved);
    }
}

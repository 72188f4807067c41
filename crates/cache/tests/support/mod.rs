//! Helpers shared by kiln-cache's integration tests. Each test binary uses a part of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use kiln_cache::{Clock, LayerFile};
use kiln_oci::{Descriptor, Digest, MediaType};

/// A real gzip-compressed layer tar holding one file with `content`.
pub fn make_layer(dir: &Path, name: &str, content: &str) -> LayerFile {
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(name), content).unwrap();
    let tar = dir.join(format!("{name}.tar"));
    let status = Command::new("tar")
        .arg("--sort=name")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg(name)
        .status()
        .unwrap();
    assert!(status.success());
    let diff_id = Digest::sha256_of(&std::fs::read(&tar).unwrap());
    let status = Command::new("gzip").arg("-nf").arg(&tar).status().unwrap();
    assert!(status.success());
    let path = PathBuf::from(format!("{}.gz", tar.display()));
    let bytes = std::fs::read(&path).unwrap();
    LayerFile {
        descriptor: Descriptor::new(
            MediaType::OciLayerGzip,
            Digest::sha256_of(&bytes),
            bytes.len() as u64,
        ),
        diff_id,
        path,
        mount_from: None,
    }
}

/// The system clock run ahead by a fixed time: a cache reading it sees every entry written
/// with the system clock that much older, without the test waiting.
#[derive(Debug)]
pub struct Ahead(pub Duration);

impl Clock for Ahead {
    fn now(&self) -> SystemTime {
        SystemTime::now() + self.0
    }
}

/// The system clock run behind by a fixed time: what a cache writes with it is that much
/// older than it is, so tests get old entries without waiting.
#[derive(Debug)]
pub struct Behind(pub Duration);

impl Clock for Behind {
    fn now(&self) -> SystemTime {
        SystemTime::now() - self.0
    }
}

/// Sets a file's modification time `age` into the past (as if written then).
pub fn make_old(path: &Path, age: Duration) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now() - age))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

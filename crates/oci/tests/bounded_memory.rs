//! A large layer goes into an OCI layout and out into a docker-archive without the process's
//! peak memory growing with it. This is the only test in its binary, so no other test's
//! allocations share the measured process.

use std::fs;
use std::io::{self, BufWriter, Read};
use std::time::Instant;

use kiln_oci::archive::{ArchiveLayer, DockerArchiveWriter};
use kiln_oci::layout::OciLayout;
use kiln_oci::{Compression, Hasher, History, ImageConfig, ImageFormat, Platform, Reference};

const LAYER_SIZE: u64 = 256 << 20;
const MAX_GROWTH_KIB: u64 = 32 << 10;

/// Incompressible pseudo-random bytes (xorshift), generated on the fly.
struct Noise {
    remaining: u64,
    state: u64,
}

impl Noise {
    fn new(len: u64) -> Noise {
        Noise {
            remaining: len,
            state: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.remaining as usize) & !7;
        let n = if n == 0 {
            buf.len().min(self.remaining as usize)
        } else {
            n
        };
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn large_layer_streams_through_layout_and_archive() {
    let mut hasher = Hasher::sha256();
    io::copy(&mut Noise::new(LAYER_SIZE), &mut hasher).unwrap();
    let digest = hasher.finish();
    let before = peak_rss_kib();

    let tmp = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(tmp.path()).unwrap();
    let started = Instant::now();
    let (stored, size) = layout
        .write_blob(Noise::new(LAYER_SIZE), Some(&digest))
        .unwrap();
    let layout_secs = started.elapsed().as_secs_f64();
    assert_eq!((stored, size), (digest.clone(), LAYER_SIZE));

    let mut config = ImageConfig::new(&Platform::host());
    config.push_layer(digest.clone(), History::default());
    let config = config.to_blob(ImageFormat::Docker).unwrap();
    let layer = ArchiveLayer {
        digest: digest.clone(),
        size: LAYER_SIZE,
        compression: Compression::None,
    };
    let archive_path = tmp.path().join("image.tar");
    let started = Instant::now();
    let mut archive =
        DockerArchiveWriter::new(BufWriter::new(fs::File::create(&archive_path).unwrap()));
    archive
        .add_image(
            &config,
            &[Reference::parse("big:1").unwrap()],
            &[layer],
            |l| {
                layout
                    .open_blob(&l.digest, Some(l.size))
                    .map_err(io::Error::other)
            },
        )
        .unwrap();
    archive.finish().unwrap();
    let archive_secs = started.elapsed().as_secs_f64();
    assert!(fs::metadata(&archive_path).unwrap().len() > LAYER_SIZE);

    let growth = peak_rss_kib().saturating_sub(before);
    let mib = (LAYER_SIZE >> 20) as f64;
    println!(
        "{mib} MiB layer: layout write {layout_secs:.2}s ({:.0} MiB/s), docker-archive {archive_secs:.2}s ({:.0} MiB/s), peak RSS growth {growth} KiB",
        mib / layout_secs,
        mib / archive_secs
    );
    assert!(
        growth < MAX_GROWTH_KIB,
        "peak RSS grew by {growth} KiB while streaming a {mib} MiB layer"
    );
}

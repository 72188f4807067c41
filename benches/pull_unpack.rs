//! Pull + unpack of the Debian base image from a loopback `docker-registry`: Kiln
//! (kiln-registry streaming into kiln-fs, one pass, nothing written but the rootfs) beside
//! `skopeo copy` + `umoci unpack` of the same image, in the same run.
//!
//! Each side runs in its own child process so its peak RSS can be read from `wait4`'s rusage:
//! this binary re-executes itself with `--child-pull-unpack` for Kiln's side.
//!
//! Run: `cargo bench -p kiln-benches --bench pull_unpack` (as root; needs docker-registry, skopeo,
//! umoci, debootstrap for the cached base). `KILN_BENCH_RUNS` sets the repetitions (default 3);
//! `KILN_BENCH_DIR` the directory the trees are written under (default: the temp dir).
//! `--unpack-file BLOB DIGEST DEST` unpacks one local blob, for profiling the unpacker alone.

#![forbid(unsafe_code)]

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use futures::StreamExt;
use kiln_benches::{measure, median, Measured};
use kiln_fs::resolve::Root;
use kiln_fs::unpack::{unpack_layer, UnpackOptions};
use kiln_oci::Digest;
use kiln_registry::{Client, RegistryOptions, Repository};

const CHILD_FLAG: &str = "--child-pull-unpack";
const REPO: &str = "bench/debian";
const TAG: &str = "bookworm";

/// What one pull + unpack did.
#[derive(Debug, Default)]
pub struct PullUnpackSummary {
    /// Layers applied.
    pub layers: usize,
    /// Compressed bytes pulled.
    pub compressed_bytes: u64,
    /// Uncompressed tar bytes applied.
    pub tar_bytes: u64,
    /// Tar entries applied.
    pub entries: u64,
}

/// Pulls `repo:tag` from the plain-HTTP registry at `registry` and unpacks its layers into
/// `dest`, streaming each blob from the network into the unpacker. Single-platform images only.
pub fn pull_and_unpack(
    registry: &str,
    repo: &str,
    tag: &str,
    dest: &Path,
) -> Result<PullUnpackSummary, Box<dyn std::error::Error + Send + Sync>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = Client::new(RegistryOptions {
        insecure_registries: vec![registry.to_owned()],
        ..RegistryOptions::default()
    })?;
    let repository = Repository::new(registry, repo)?;
    let manifest = runtime.block_on(client.get_manifest(&repository, tag))?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.bytes)?;
    let config_digest = Digest::parse(
        manifest["config"]["digest"]
            .as_str()
            .ok_or("manifest without config")?,
    )?;
    let config = runtime.block_on(async {
        let mut body = Vec::new();
        let mut stream = client.get_blob(&repository, &config_digest).await?;
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk?);
        }
        Ok::<_, kiln_registry::Error>(body)
    })?;
    let config: serde_json::Value = serde_json::from_slice(&config)?;
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or("config without diff_ids")?;

    std::fs::create_dir_all(dest)?;
    let root = Root::open(dest)?;
    let mut summary = PullUnpackSummary::default();
    let layers = manifest["layers"]
        .as_array()
        .ok_or("manifest without layers")?;
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let digest = Digest::parse(layer["digest"].as_str().ok_or("layer without digest")?)?;
        let diff_id = Digest::parse(diff_id.as_str().ok_or("bad diff_id")?)?;
        // The download runs on the runtime; the unpack reads it through a bounded channel on
        // this thread, so at most CHANNEL_DEPTH chunks are in memory.
        const CHANNEL_DEPTH: usize = 16;
        let (sender, receiver) =
            tokio::sync::mpsc::channel::<io::Result<bytes::Bytes>>(CHANNEL_DEPTH);
        let download = {
            let client = client.clone();
            let repository = repository.clone();
            let digest = digest.clone();
            runtime.spawn(async move {
                let mut stream = match client.get_blob(&repository, &digest).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        let _ = sender.send(Err(io::Error::other(e))).await;
                        return;
                    }
                };
                while let Some(chunk) = stream.next().await {
                    let item = chunk.map_err(io::Error::other);
                    let failed = item.is_err();
                    if sender.send(item).await.is_err() || failed {
                        return;
                    }
                }
            })
        };
        let report = unpack_layer(
            &root,
            ChannelReader {
                receiver,
                current: bytes::Bytes::new(),
            },
            &digest,
            UnpackOptions {
                diff_id: Some(&diff_id),
                ..Default::default()
            },
        )?;
        runtime.block_on(download)?;
        summary.layers += 1;
        summary.compressed_bytes += report.compressed_size;
        summary.tar_bytes += report.uncompressed_size;
        summary.entries += report.entries;
    }
    Ok(summary)
}

/// A blocking reader over chunks sent by the download task.
struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0), // the sender is gone: end of the blob
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == CHILD_FLAG) {
        let (registry, dest) = (&args[i + 1], PathBuf::from(&args[i + 2]));
        match pull_and_unpack(registry, REPO, TAG, &dest) {
            Ok(summary) => eprintln!("{summary:?}"),
            Err(e) => {
                eprintln!("pull+unpack failed: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--unpack-file") {
        // Unpack only, from a blob file: `--unpack-file BLOB DIGEST DEST` (for profiling).
        let (blob, digest, dest) = (&args[i + 1], &args[i + 2], PathBuf::from(&args[i + 3]));
        std::fs::create_dir_all(&dest).expect("create destination");
        let root = Root::open(&dest).expect("open destination");
        let digest = Digest::parse(digest).expect("digest");
        let file = std::fs::File::open(blob).expect("open blob");
        let report = unpack_layer(&root, file, &digest, UnpackOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{report:?}");
        return;
    }
    if args.iter().any(|a| a == "--list") {
        // `cargo test --benches` lists benches; there is nothing to list.
        return;
    }
    kiln_testkit::require_tools(&["skopeo", "umoci", "docker-registry"]);
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let registry = kiln_testkit::Registry::start();
    kiln_testkit::image::push_rootfs(
        &registry,
        kiln_testkit::bases::debian_rootfs(),
        &format!("{REPO}:{TAG}"),
    );
    let addr = registry.addr();
    let me = std::env::current_exe().expect("own executable");
    // KILN_BENCH_DIR picks the filesystem the trees are written to (e.g. a tmpfs, to take a
    // busy disk out of the comparison); the default is the system temp dir.
    let work = match std::env::var_os("KILN_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");

    let (mut kiln, mut skopeo, mut umoci) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let dest = work.path().join(format!("kiln-{run}"));
        kiln.push(measure(
            Command::new(&me).arg(CHILD_FLAG).arg(&addr).arg(&dest),
        ));
        std::fs::remove_dir_all(&dest).expect("clean kiln rootfs");

        let layout = work.path().join(format!("layout-{run}"));
        let bundle = work.path().join(format!("bundle-{run}"));
        skopeo.push(measure(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--src-tls-verify=false"])
                .arg(format!("docker://{addr}/{REPO}:{TAG}"))
                .arg(format!("oci:{}:img", layout.display())),
        ));
        umoci.push(measure(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:img", layout.display()))
                .arg(&bundle),
        ));
        std::fs::remove_dir_all(&layout).expect("clean layout");
        std::fs::remove_dir_all(&bundle).expect("clean bundle");
    }
    let kiln_total: Vec<Measured> = kiln.clone();
    let reference: Vec<Measured> = skopeo
        .iter()
        .zip(&umoci)
        .map(|(s, u)| Measured {
            wall: s.wall + u.wall,
            cpu: s.cpu + u.cpu,
            max_rss_kib: s.max_rss_kib.max(u.max_rss_kib),
        })
        .collect();
    let (k, s, u, r) = (
        median(kiln_total),
        median(skopeo),
        median(umoci),
        median(reference),
    );
    let mib = |kib: i64| kib as f64 / 1024.0;
    println!(
        "pull + unpack of the Debian base (debootstrap minbase bookworm) from {addr} into {}, median of {runs} runs",
        work.path().display()
    );
    println!(
        "{:<34} {:>10} {:>10} {:>14}",
        "", "wall (s)", "CPU (s)", "peak RSS (MiB)"
    );
    println!(
        "{:<34} {:>10.2} {:>10.2} {:>14.1}",
        "kiln (kiln-registry -> kiln-fs)",
        k.wall.as_secs_f64(),
        k.cpu.as_secs_f64(),
        mib(k.max_rss_kib)
    );
    println!(
        "{:<34} {:>10.2} {:>10.2} {:>14.1}",
        "skopeo copy",
        s.wall.as_secs_f64(),
        s.cpu.as_secs_f64(),
        mib(s.max_rss_kib)
    );
    println!(
        "{:<34} {:>10.2} {:>10.2} {:>14.1}",
        "umoci unpack",
        u.wall.as_secs_f64(),
        u.cpu.as_secs_f64(),
        mib(u.max_rss_kib)
    );
    println!(
        "{:<34} {:>10.2} {:>10.2} {:>14.1}",
        "skopeo + umoci",
        r.wall.as_secs_f64(),
        r.cpu.as_secs_f64(),
        mib(r.max_rss_kib)
    );
    println!(
        "kiln / (skopeo + umoci): wall {:.2}x, CPU {:.2}x; kiln peak RSS {} the 64 MiB target",
        k.wall.as_secs_f64() / r.wall.as_secs_f64(),
        k.cpu.as_secs_f64() / r.cpu.as_secs_f64(),
        if k.max_rss_kib < 64 * 1024 {
            "within"
        } else {
            "OVER"
        }
    );
}

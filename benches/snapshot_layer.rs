//! Snapshot and layer-writing figures on a real Debian base (issue 4, acceptance 4):
//! `cargo bench -p kiln-benches --bench snapshot_layer`.
//!
//! Prints the snapshot time of the unchanged base and after a step that wrote 20,000 small
//! files, and layer-writing throughput for gzip on 1 and 2 threads and zstd, beside
//! `tar | gzip -6` and `tar | pigz` on the same tree.
//!
//! On a machine shared with other work, `KILN_BENCH_REALTIME=1` runs the benchmark (and the
//! threads and processes it starts) under `SCHED_FIFO`, which approximates an idle machine; the
//! kernel's real-time throttling still leaves other processes 5% of each core.

#![warn(clippy::undocumented_unsafe_blocks)]

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_fs::blobstore::BlobStore;
use kiln_fs::compress::Compression;
use kiln_fs::layer::{write_layer, LayerOptions};
use kiln_fs::snapshot::{Index, SnapshotOptions, Snapshotter};

fn main() {
    kiln_testkit::require_tools(&["tar", "gzip", "pigz", "cp"]);
    if std::env::var_os("KILN_BENCH_REALTIME").is_some() {
        let param = libc::sched_param { sched_priority: 10 };
        // SAFETY: plain syscall on the calling thread with a valid parameter struct; threads and
        // processes started afterwards inherit the policy.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
        println!(
            "SCHED_FIFO: {}",
            if rc == 0 { "on" } else { "refused (not root?)" }
        );
    }
    // Wall times only mean something on an idle machine; CPU times are printed beside them.
    println!(
        "load average at start: {} ({} cores)",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let base = kiln_testkit::bases::debian_rootfs();
    let work = tempfile::tempdir().expect("temp dir");
    let root = work.path().join("rootfs");
    let status = Command::new("cp")
        .arg("-a")
        .arg(base)
        .arg(&root)
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a {} failed", base.display());

    // Snapshots.
    let mut snapshotter =
        Snapshotter::new(&root, Index::new(), &SnapshotOptions::default()).expect("snapshotter");
    snapshotter.rescan().expect("baseline");
    let files = snapshotter.index().len();
    let cpu_before = cpu_time(libc::RUSAGE_SELF);
    let unchanged = repeat(15, || {
        let diff = snapshotter.snapshot().expect("snapshot");
        assert!(
            diff.is_empty(),
            "unchanged base reported {} changes",
            diff.len()
        );
    });
    let cpu_each = (cpu_time(libc::RUSAGE_SELF) - cpu_before) / 15;
    println!(
        "snapshot, unchanged Debian base ({files} paths): median {:.1} ms, min {:.1} ms wall, {:.1} ms CPU (both cores together) (target < 30 ms)",
        ms(median(&unchanged)),
        ms(unchanged[0]),
        ms(cpu_each)
    );

    let started = Instant::now();
    for d in 0..200 {
        let dir = root.join(format!("srv/gen/{d:03}"));
        fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..100 {
            fs::write(
                dir.join(format!("file-{f:03}.txt")),
                format!("generated file {d}/{f}\n"),
            )
            .expect("write");
        }
    }
    let wrote = started.elapsed();
    let started = Instant::now();
    let diff = snapshotter.snapshot().expect("snapshot");
    let after_step = started.elapsed();
    println!(
        "snapshot after a step writing 20,000 small files ({:.0} ms to write them): {:.1} ms, {} changes",
        ms(wrote),
        ms(after_step),
        diff.len()
    );
    let unchanged_big = repeat(5, || {
        assert!(snapshotter.snapshot().expect("snapshot").is_empty());
    });
    println!(
        "snapshot, unchanged base + 20,000 files ({} paths): median {:.1} ms",
        snapshotter.index().len(),
        ms(median(&unchanged_big))
    );
    fs::remove_dir_all(root.join("srv/gen")).expect("cleanup");

    // Layer writing: the whole base as one layer.
    let mut full =
        Snapshotter::new(&root, Index::new(), &SnapshotOptions::default()).expect("snapshotter");
    let diff = full.snapshot().expect("snapshot");
    let store = BlobStore::open(work.path().join("store")).expect("store");
    let mut results = Vec::new();
    for (label, compression, threads) in [
        ("kiln gzip -6, 1 thread", Compression::Gzip { level: 6 }, 1),
        ("kiln gzip -6, 2 threads", Compression::Gzip { level: 6 }, 2),
        ("kiln zstd -3", Compression::Zstd { level: 3 }, 1),
    ] {
        let options = LayerOptions {
            compression,
            threads,
            source_date_epoch: None,
        };
        // First run warms the page cache; the second is measured.
        let _ = write_layer(&root, &diff, &store, &options).expect("layer");
        let cpu_before = cpu_time(libc::RUSAGE_SELF);
        let started = Instant::now();
        let layer = write_layer(&root, &diff, &store, &options).expect("layer");
        let took = started.elapsed();
        let cpu = cpu_time(libc::RUSAGE_SELF) - cpu_before;
        let mbps = layer.uncompressed_size as f64 / 1e6 / took.as_secs_f64();
        println!(
            "{label}: {:.1} MB tar -> {:.1} MB in {:.2} s = {mbps:.1} MB/s (CPU {:.2} s)",
            layer.uncompressed_size as f64 / 1e6,
            layer.size as f64 / 1e6,
            took.as_secs_f64(),
            cpu.as_secs_f64()
        );
        results.push((label, mbps));
        fs::remove_file(&layer.path).expect("remove blob");
    }

    let tar_bytes = shell_output(&format!(
        "tar --numeric-owner -C {} -cf - . | wc -c",
        root.display()
    ))
    .trim()
    .parse::<f64>()
    .expect("tar size");
    let out = work.path().join("out.gz");
    for (label, compressor) in [
        ("tar | gzip -6", "gzip -6"),
        ("tar | pigz -6 (2 threads)", "pigz -6 -p 2"),
    ] {
        let cmd = format!(
            "set -o pipefail; tar --numeric-owner -C {} -cf - . | {compressor} > {}",
            root.display(),
            out.display()
        );
        let cpu_before = cpu_time(libc::RUSAGE_CHILDREN);
        let started = Instant::now();
        shell_output(&cmd);
        let took = started.elapsed();
        let cpu = cpu_time(libc::RUSAGE_CHILDREN) - cpu_before;
        let mbps = tar_bytes / 1e6 / took.as_secs_f64();
        println!(
            "{label}: {:.1} MB tar -> {:.1} MB in {:.2} s = {mbps:.1} MB/s (CPU {:.2} s)",
            tar_bytes / 1e6,
            fs::metadata(&out).map(|m| m.len()).unwrap_or(0) as f64 / 1e6,
            took.as_secs_f64(),
            cpu.as_secs_f64()
        );
        results.push((label, mbps));
    }
    let speed = |name: &str| {
        results
            .iter()
            .find(|(l, _)| *l == name)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    };
    println!(
        "kiln parallel gzip (2 threads) vs single-threaded gzip -6: {:.2}x (target >= 1.6x); vs kiln 1 thread: {:.2}x",
        speed("kiln gzip -6, 2 threads") / speed("tar | gzip -6"),
        speed("kiln gzip -6, 2 threads") / speed("kiln gzip -6, 1 thread")
    );
}

fn repeat(n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort();
    times
}

/// User plus system CPU time of this process (all threads) or of its waited-for children.
fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn shell_output(cmd: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

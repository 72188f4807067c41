//! `--upper-tmpfs` (chroot mode as root, bases mounted): a stage's overlay upper dir on tmpfs
//! gives the same image, to the digest, as one on disk; a stage that fills the tmpfs continues
//! on disk, its earlier steps' layers applied there, and the step that filled it runs again.
//! Against a real registry.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kiln_engine::{BuildEvent, BuildOptions, Builder, UpperTmpfs};
use kiln_sandbox::Mode;
use kiln_testkit::{bases, image, Registry};

fn options_for(
    registry: &Registry,
    context: &Path,
    kiln_dir: &Path,
    upper_tmpfs: UpperTmpfs,
    destination: &str,
) -> BuildOptions {
    let mut options = BuildOptions::new(context.to_string_lossy());
    options.mode = Some(Mode::Chroot);
    options.kiln_dir = kiln_dir.to_path_buf();
    options.registry.insecure_registries.push(registry.addr());
    options.output.reproducible = true;
    options.snapshot.upper_tmpfs = upper_tmpfs;
    options
        .output
        .destinations
        .push(format!("{}/{destination}", registry.addr()));
    options
}

/// What a build gave, and the upper dirs the overlays mounted under its kiln dir had while it
/// ran (read from `/proc/self/mountinfo` every few milliseconds).
struct Built {
    digest: String,
    notes: Vec<String>,
    upper_dirs: Vec<String>,
    /// The tmpfs mount points seen in the kiln dir.
    tmpfs_mounts: Vec<String>,
    /// The most lower dirs a stage's overlay had.
    most_lowers: usize,
}

async fn build(options: BuildOptions) -> Built {
    let kiln_dir = options.kiln_dir.to_string_lossy().into_owned();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut seen: Vec<String> = Vec::new();
            let mut tmpfs: Vec<String> = Vec::new();
            let mut most_lowers = 0;
            while !stop.load(Ordering::Relaxed) {
                let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
                for line in mounts.lines() {
                    let Some((mount, fs)) = line.split_once(" - ") else {
                        continue;
                    };
                    let point = mount.split(' ').nth(4).unwrap_or_default();
                    if fs.starts_with("tmpfs ")
                        && point.starts_with(&kiln_dir)
                        && !tmpfs.iter().any(|t| t == point)
                    {
                        tmpfs.push(point.to_owned());
                    }
                    let at_stage = mount.split(' ').nth(4).is_some_and(|point| {
                        point.starts_with(&kiln_dir)
                            && Path::new(point)
                                .file_name()
                                .and_then(|n| n.to_str()?.strip_prefix("stage-"))
                                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    });
                    if !at_stage || !fs.starts_with("overlay ") {
                        continue;
                    }
                    let lowers = fs
                        .split(',')
                        .filter(|o| o.starts_with("lowerdir+="))
                        .count()
                        .max(
                            fs.split(',')
                                .find_map(|o| o.strip_prefix("lowerdir="))
                                .map_or(0, |l| l.split(':').count()),
                        );
                    most_lowers = most_lowers.max(lowers);
                    for option in fs.split(',') {
                        if let Some(upper) = option.strip_prefix("upperdir=") {
                            if !seen.iter().any(|s| s == upper) {
                                seen.push(upper.to_owned());
                            }
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            (seen, tmpfs, most_lowers)
        })
    };
    let report = Builder::new(options)
        .events(Arc::new(move |e: BuildEvent| sink.lock().unwrap().push(e)))
        .build()
        .await;
    stop.store(true, Ordering::Relaxed);
    let (upper_dirs, tmpfs_mounts, most_lowers) = watcher.join().unwrap();
    let events = events.lock().unwrap().clone();
    let notes: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Note { message } => Some(message.clone()),
            _ => None,
        })
        .collect();
    let report = report.unwrap_or_else(|e| panic!("build failed: {e}; notes: {notes:#?}"));
    Built {
        digest: report.digest.to_string(),
        notes,
        upper_dirs,
        tmpfs_mounts,
        most_lowers,
    }
}

impl Built {
    /// Whether `upper` (an overlay's upperdir option) is under one of the tmpfs mounts seen in
    /// the kiln dir while the build ran.
    fn on_tmpfs(&self, upper: &str) -> bool {
        self.tmpfs_mounts
            .iter()
            .any(|point| Path::new(upper).starts_with(point))
    }
}

fn context_with(dir: &Path, dockerfile: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("a"), "from the context\n").unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
}

/// Builds `context` (tagged `NAME:tmpfs` and `NAME:disk`) with its upper dirs on a 4 MiB
/// tmpfs, then on disk, each with a Kiln dir of its own.
async fn on_a_small_tmpfs_and_on_disk(
    registry: &Registry,
    work: &Path,
    context: &Path,
    name: &str,
) -> (Built, Built) {
    let mut built = Vec::new();
    for (mode, tag) in [(UpperTmpfs::Always, "tmpfs"), (UpperTmpfs::Never, "disk")] {
        let kiln_dir = work.join(format!("kiln-{name}-{tag}"));
        let mut options = options_for(registry, context, &kiln_dir, mode, &format!("{name}:{tag}"));
        options.snapshot.upper_tmpfs_size = Some(4 << 20);
        built.push(build(options).await);
    }
    let disk = built.pop().expect("built on disk");
    (built.pop().expect("built on tmpfs"), disk)
}

/// Asserts that the build moved its stage to disk once, saying `note`.
fn assert_moved_once(built: &Built, note: &str) {
    let moves: Vec<&String> = built
        .notes
        .iter()
        .filter(|n| n.contains("tmpfs upper dir"))
        .collect();
    assert_eq!(moves, [note], "notes: {:#?}", built.notes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_files_give_the_same_image_on_tmpfs_and_on_disk() {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    context_with(
        &context,
        &format!(
            "FROM {}/library/busybox:latest\n\
             RUN mkdir /t && cd /t && seq 1 3000 | xargs touch && echo x > /t/1 && rm /bin/ls\n\
             COPY a /t/a\n\
             RUN rm /t/2 && mkdir /t/d && seq 1 200 | sed 's,^,/t/d/,' | xargs touch\n",
            registry.addr()
        ),
    );
    let mut built = Vec::new();
    for (mode, tag) in [(UpperTmpfs::Always, "tmpfs"), (UpperTmpfs::Never, "disk")] {
        let kiln_dir = work.path().join(format!("kiln-{tag}"));
        let options = options_for(
            &registry,
            &context,
            &kiln_dir,
            mode,
            &format!("small:{tag}"),
        );
        built.push(build(options).await);
    }
    let (tmpfs, disk) = (&built[0], &built[1]);
    assert!(
        !tmpfs.upper_dirs.is_empty() && tmpfs.upper_dirs.iter().all(|u| tmpfs.on_tmpfs(u)),
        "with --upper-tmpfs=true the stage's upper dir is on the tmpfs: {:?}",
        tmpfs.upper_dirs
    );
    assert!(
        !disk.upper_dirs.is_empty() && !disk.upper_dirs.iter().any(|u| disk.on_tmpfs(u)),
        "with --upper-tmpfs=false the stage's upper dir is on disk: {:?}",
        disk.upper_dirs
    );
    assert!(
        !tmpfs.notes.iter().any(|n| n.contains("tmpfs upper dir")),
        "nothing filled the tmpfs: {:#?}",
        tmpfs.notes
    );
    assert_eq!(tmpfs.digest, disk.digest, "the two images differ");

    let flat = image::flatten(&registry, "small:tmpfs");
    let t = flat.rootfs.join("t");
    assert_eq!(std::fs::read_to_string(t.join("1")).unwrap(), "x\n");
    assert_eq!(
        std::fs::read_to_string(t.join("a")).unwrap(),
        "from the context\n"
    );
    assert!(!t.join("2").exists() && t.join("3000").exists());
    assert_eq!(std::fs::read_dir(t.join("d")).unwrap().count(), 200);
    assert!(!flat.rootfs.join("bin/ls").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tmpfs_moves_the_stage_to_disk_and_runs_the_step_again() {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();

    // Step 2 writes files and removes a base file (a whiteout), step 3 copies, step 4 writes
    // 20 MB into a 4 MiB tmpfs and fails there, step 5 runs on disk after the move.
    let context = work.path().join("full");
    context_with(
        &context,
        &format!(
            "FROM {}/library/busybox:latest\n\
             RUN rm /bin/ls && mkdir /data && echo one > /data/one && seq 1 50 | sed 's,^,/data/f,' | xargs touch\n\
             COPY a /data/a\n\
             RUN dd if=/dev/zero of=/data/big bs=1M count=20 && echo after > /data/after\n\
             RUN echo three > /data/three && test ! -e /bin/ls && test -e /data/f50\n",
            registry.addr()
        ),
    );
    let (tmpfs, disk) =
        on_a_small_tmpfs_and_on_disk(&registry, work.path(), &context, "full").await;
    let (tmpfs, disk) = (&tmpfs, &disk);
    assert_moved_once(
        tmpfs,
        "Dockerfile:4: the tmpfs upper dir (cap 4 MiB) is full: the stage continues on disk \
         and the step runs again",
    );
    // The stage started on the tmpfs and ended on disk.
    assert!(
        tmpfs.upper_dirs.iter().any(|u| tmpfs.on_tmpfs(u))
            && tmpfs.upper_dirs.iter().any(|u| !tmpfs.on_tmpfs(u)),
        "{:?}",
        tmpfs.upper_dirs
    );
    assert_eq!(tmpfs.digest, disk.digest, "the two images differ");

    let flat = image::flatten(&registry, "full:tmpfs");
    let data = flat.rootfs.join("data");
    assert_eq!(std::fs::metadata(data.join("big")).unwrap().len(), 20 << 20);
    for (name, content) in [
        ("one", "one\n"),
        ("a", "from the context\n"),
        ("after", "after\n"),
        ("three", "three\n"),
    ] {
        assert_eq!(std::fs::read_to_string(data.join(name)).unwrap(), content);
    }
    assert!(data.join("f1").exists() && data.join("f50").exists());
    assert!(!flat.rootfs.join("bin/ls").exists());
    assert!(flat.rootfs.join("bin/sh").exists());
    // One layer per step, as on disk: the failed attempt made none.
    let diff_ids = flat.config["rootfs"]["diff_ids"].as_array().unwrap().len();
    let base = image::flatten(&registry, "library/busybox:latest").config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(diff_ids, base + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tmpfs_three_quarters_full_moves_the_stage_before_its_next_step() {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("filling");
    context_with(
        &context,
        &format!(
            "FROM {}/library/busybox:latest\n\
             RUN rm /bin/ls && dd if=/dev/zero of=/mid bs=512k count=7\n\
             RUN echo next > /next && rm /mid\n",
            registry.addr()
        ),
    );
    let built = on_a_small_tmpfs_and_on_disk(&registry, work.path(), &context, "filling").await;
    assert_moved_once(
        &built.0,
        "Dockerfile:3: the tmpfs upper dir (cap 4 MiB) is more than three quarters full: the \
         stage continues on disk",
    );
    assert_eq!(built.0.digest, built.1.digest, "the two images differ");
    let flat = image::flatten(&registry, "filling:tmpfs");
    assert!(!flat.rootfs.join("mid").exists() && !flat.rootfs.join("bin/ls").exists());
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("next")).unwrap(),
        "next\n"
    );
}

/// The earlier steps are cache hits, mounted as lower dirs under the stage's tmpfs upper dir:
/// a stage that then moves to disk mounts them again and applies nothing twice, and the image
/// is the one a build on disk makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_over_mounted_cache_hits_moves_to_disk() {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let context = work.path().join("hits");
    context_with(
        &context,
        &format!(
            "FROM {}/library/busybox:latest\n\
             RUN rm /bin/ls && mkdir /data && echo one > /data/one\n\
             COPY a /data/a\n\
             ARG MIB\n\
             RUN dd if=/dev/zero of=/data/big bs=1M count=$MIB && echo after > /data/after\n",
            registry.addr()
        ),
    );
    let run = |mib: &str, mode: UpperTmpfs, tag: &str| {
        let kiln_dir = work.path().join(format!("kiln-hits-{tag}"));
        let mut options = options_for(&registry, &context, &kiln_dir, mode, &format!("hits:{tag}"));
        options.snapshot.upper_tmpfs_size = Some(4 << 20);
        options.cache.enabled = true;
        options.cache.repo = Some(format!("oci:{}", cache.display()));
        options.build_args.insert("MIB".into(), mib.into());
        options
    };
    // Fills the cache with the first two steps' layers.
    build(run("1", UpperTmpfs::Never, "seed")).await;
    let tmpfs = build(run("20", UpperTmpfs::Always, "tmpfs")).await;
    let disk = build(run("20", UpperTmpfs::Never, "disk")).await;
    assert_moved_once(
        &tmpfs,
        "Dockerfile:5: the tmpfs upper dir (cap 4 MiB) is full: the stage continues on disk \
         and the step runs again",
    );
    // The base's layer and the two hits.
    assert_eq!(tmpfs.most_lowers, 3, "{:?}", tmpfs.upper_dirs);
    assert_eq!(tmpfs.digest, disk.digest, "the two images differ");
    let flat = image::flatten(&registry, "hits:tmpfs");
    assert_eq!(
        std::fs::metadata(flat.rootfs.join("data/big"))
            .unwrap()
            .len(),
        20 << 20
    );
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("data/one")).unwrap(),
        "one\n"
    );
    assert!(!flat.rootfs.join("bin/ls").exists());
}

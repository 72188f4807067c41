//! `--base-overlay` (chroot mode as root): a stage's base mounted as an overlay of layer trees
//! gives the same image, to the digest, as the base unpacked into the stage; the trees are made
//! once per kiln dir. Against a real registry.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_engine::{BuildEvent, BuildOptions, Builder};
use kiln_sandbox::Mode;
use kiln_testkit::{bases, image, Registry};

fn options_for(registry: &Registry, context: &Path, kiln_dir: &Path) -> BuildOptions {
    let mut options = BuildOptions::new(context.to_string_lossy());
    options.mode = Some(Mode::Chroot);
    options.kiln_dir = kiln_dir.to_path_buf();
    options.registry.insecure_registries.push(registry.addr());
    options.output.reproducible = true;
    options
}

async fn build(options: BuildOptions) -> (String, Vec<BuildEvent>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let report = Builder::new(options)
        .events(Arc::new(move |e: BuildEvent| sink.lock().unwrap().push(e)))
        .build()
        .await
        .unwrap_or_else(|e| panic!("build failed: {e}"));
    let events = events.lock().unwrap().clone();
    (report.digest.to_string(), events)
}

/// The layer trees in the kiln dir (the store's own dot files, its locks and stamps, left out).
fn trees(kiln_dir: &Path) -> usize {
    std::fs::read_dir(kiln_dir.join("layers"))
        .map(|entries| {
            entries
                .filter(|e| {
                    !e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with('.')
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_and_unpacked_bases_give_the_same_image() {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();

    // A base of three layers with a whiteout and an opaque directory, made by Kiln itself.
    let base_context = work.path().join("base");
    std::fs::create_dir(&base_context).unwrap();
    std::fs::write(
        base_context.join("Dockerfile"),
        format!(
            "FROM {}/library/busybox:latest\n\
             RUN rm /bin/ls && mkdir -p /opt/a && echo x > /opt/a/f && echo keep > /opt/keep\n\
             RUN rm -rf /opt/a && mkdir /opt/a && echo y > /opt/a/g\n",
            registry.addr()
        ),
    )
    .unwrap();
    let mut options = options_for(&registry, &base_context, &work.path().join("kiln-base"));
    options.snapshot.base_overlay = false;
    options
        .output
        .destinations
        .push(format!("{}/layered:base", registry.addr()));
    build(options).await;

    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("a"), "a").unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {0}/layered:base AS side\n\
             RUN echo side > /side\n\
             FROM {0}/layered:base\n\
             RUN ls -a /opt/a > /listing && cat /opt/keep >> /listing\n\
             RUN echo extra >> /etc/passwd && rm /bin/cat && chmod 700 /home/kiln\n\
             RUN touch /etc/hostname-probe && rm /etc/hostname-probe\n\
             COPY a /etc/a\n\
             RUN mkdir -p /usr/bin/deeper && echo z > /usr/bin/deeper/z\n\
             RUN echo s > /tmp/scratch && mkdir -p /srv/new && echo n > /srv/new/n\n\
             RUN rm /tmp/scratch && rm -rf /srv/new /opt && mkdir /srv/new /opt && echo m > /srv/new/m\n\
             RUN true\n\
             COPY --from=side /side /side\n\
             COPY --from={0}/layered:base /opt/keep /from-image\n",
            registry.addr()
        ),
    )
    .unwrap();
    let mut digests = Vec::new();
    for (overlay, tag) in [(true, "mounted"), (false, "unpacked")] {
        let kiln_dir = work.path().join(format!("kiln-{tag}"));
        let mut options = options_for(&registry, &context, &kiln_dir);
        options.snapshot.base_overlay = overlay;
        // With --cleanup the work dir is gone when the build returns; without, a background
        // thread deletes it (checked below).
        options.cleanup = !overlay;
        options
            .output
            .destinations
            .push(format!("{}/layered:{tag}", registry.addr()));
        let (digest, events) = build(options).await;
        if !overlay {
            let left: Vec<_> = std::fs::read_dir(kiln_dir.join("work"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(left.is_empty(), "--cleanup left {left:?}");
        }
        let notes: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                BuildEvent::Note { message } => Some(message.clone()),
                _ => None,
            })
            .collect();
        if overlay {
            assert_eq!(
                trees(&kiln_dir),
                3,
                "one tree per base layer; notes: {notes:#?}"
            );
        } else {
            assert_eq!(trees(&kiln_dir), 0);
        }
        digests.push(digest);
    }
    assert_eq!(digests[0], digests[1], "the two images differ");

    let flat = image::flatten(&registry, "layered:mounted");
    let listing = std::fs::read_to_string(flat.rootfs.join("listing")).unwrap();
    assert_eq!(listing, ".\n..\ng\nkeep\n");
    assert!(!flat.rootfs.join("bin/cat").exists() && !flat.rootfs.join("bin/ls").exists());
    assert!(flat.rootfs.join("bin/sh").exists());
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("usr/bin/deeper/z")).unwrap(),
        "z\n"
    );
    // Paths an earlier step wrote and a later one removed, a lower directory replaced, and
    // what the copies from a stage and from an image brought.
    assert!(!flat.rootfs.join("tmp/scratch").exists());
    assert!(!flat.rootfs.join("srv/new/n").exists());
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("srv/new/m")).unwrap(),
        "m\n"
    );
    assert_eq!(
        std::fs::read_dir(flat.rootfs.join("opt")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("side")).unwrap(),
        "side\n"
    );
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("from-image")).unwrap(),
        "keep\n"
    );
    let diff_ids = flat.config["rootfs"]["diff_ids"].as_array().unwrap().len();
    // Three base layers and one per RUN and COPY but `RUN true` (the probe that created and
    // removed a file still moved /etc's mtime).
    assert_eq!(diff_ids, 12, "{:#}", flat.config["history"]);

    // Nothing stays mounted, and the work dirs go (in the background, after the build).
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = work.path().to_string_lossy().into_owned();
    assert!(!mounts.contains(&root), "still mounted:\n{mounts}");
    for tag in ["mounted", "unpacked"] {
        let work_root = work.path().join(format!("kiln-{tag}/work"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::read_dir(&work_root).unwrap().count() > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let left: Vec<_> = std::fs::read_dir(&work_root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{tag}: left in the work dir: {left:?}");
    }
}

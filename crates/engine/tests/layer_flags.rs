//! `--single-snapshot` (one layer per stage, as kaniko makes), `--force-build-metadata` (one
//! layer per step, as kaniko makes) and `COPY --link` (a layer made on its own, reused from the
//! cache when only what is below it changes, as BuildKit does), against a real registry.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use kiln_engine::{BuildEvent, BuildOptions, Builder};
use kiln_sandbox::Mode;
use kiln_testkit::{bases, image, run, Registry};

fn options_for(registry: &Registry, context: &Path, kiln_dir: &Path) -> BuildOptions {
    let mut options = BuildOptions::new(context.to_string_lossy());
    options.mode = Some(Mode::Chroot);
    options.kiln_dir = kiln_dir.to_path_buf();
    options.registry.insecure_registries.push(registry.addr());
    options
}

async fn build(options: BuildOptions) -> Vec<BuildEvent> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    Builder::new(options)
        .events(Arc::new(move |e: BuildEvent| sink.lock().unwrap().push(e)))
        .build()
        .await
        .unwrap_or_else(|e| panic!("build failed: {e}"));
    let events = events.lock().unwrap().clone();
    events
}

fn layer_count(flat: &image::Flattened) -> usize {
    flat.config["rootfs"]["diff_ids"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_snapshot_makes_one_layer_per_stage() {
    let registry = Registry::start();
    let base = format!("{}/library/busybox:latest", registry.addr());
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    for name in ["a", "b", "d"] {
        std::fs::write(context.join(name), name).unwrap();
    }
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {base}\nCOPY a /a\nCOPY b /b\nRUN echo c > /c && rm /b\nCOPY d /d\nENV X=1\n"
        ),
    )
    .unwrap();
    let mut options = options_for(&registry, &context, &work.path().join("kiln"));
    options.snapshot.single_snapshot = true;
    options
        .output
        .destinations
        .push(format!("{}/single:1", registry.addr()));
    let events = build(options).await;
    let layers_made = events
        .iter()
        .filter(|e| matches!(e, BuildEvent::LayerCreated { .. }))
        .count();
    assert_eq!(layers_made, 1, "{events:#?}");

    let flat = image::flatten(&registry, "single:1");
    assert_eq!(
        layer_count(&flat),
        2,
        "the base's layer and one of the stage"
    );
    for (file, content) in [("a", "a"), ("c", "c\n"), ("d", "d")] {
        assert_eq!(
            std::fs::read_to_string(flat.rootfs.join(file)).unwrap(),
            content
        );
    }
    assert!(!flat.rootfs.join("b").exists(), "deleted within the stage");
    let history = flat.config["history"].as_array().unwrap();
    let with_layers = history
        .iter()
        .filter(|h| h["empty_layer"].as_bool() != Some(true))
        .count();
    assert_eq!(with_layers, 2, "{history:#?}");
    assert_eq!(flat.config["config"]["Env"][1], "X=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_build_metadata_gives_every_step_a_layer_also_from_the_cache() {
    let registry = Registry::start();
    let base = format!("{}/library/busybox:latest", registry.addr());
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("a"), "a").unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {base}\nENV X=1\nRUN true\nCOPY a /a\nLABEL l=v\nWORKDIR /\n"),
    )
    .unwrap();
    let kiln_dir = work.path().join("kiln");
    let build_to = |tag: &str, forced: bool| {
        let mut options = options_for(&registry, &context, &kiln_dir);
        options.snapshot.force_build_metadata = forced;
        options.cache.enabled = true;
        options
            .output
            .destinations
            .push(format!("{}/forced:{tag}", registry.addr()));
        options
    };
    // A usual build first, whose cache entries have no layer for four of the five steps: the
    // forced build must not take them.
    build(build_to("usual", false)).await;
    let usual = image::flatten(&registry, "forced:usual");
    assert_eq!(layer_count(&usual), 2, "the base's layer and COPY's");

    for tag in ["cold", "cached"] {
        build(build_to(tag, true)).await;
        let flat = image::flatten(&registry, &format!("forced:{tag}"));
        assert_eq!(
            layer_count(&flat),
            6,
            "{tag}: the base's layer and one per step"
        );
        let history = flat.config["history"].as_array().unwrap();
        assert!(
            history
                .iter()
                .all(|h| h["empty_layer"].as_bool() != Some(true)),
            "{tag}: {history:#?}"
        );
        assert_eq!(std::fs::read_to_string(flat.rootfs.join("a")).unwrap(), "a");
    }
}

/// A base rootfs: busybox plus `extra` (another image under the same tag).
fn base_with(dir: &Path, extra: &str) -> std::path::PathBuf {
    let rootfs = dir.join(format!("base-{extra}"));
    run(Command::new("cp")
        .arg("-a")
        .arg(bases::busybox_rootfs())
        .arg(&rootfs));
    std::fs::write(rootfs.join(extra), extra).unwrap();
    rootfs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_copy_is_reused_when_only_the_base_changes() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let base = format!("{}/base/app:1", registry.addr());
    image::push_rootfs(&registry, &base_with(work.path(), "one"), "base/app:1");
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("f"), "linked\n").unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {base}\nCOPY --link f /app/f\nCOPY g* /app/\n"),
    )
    .unwrap();
    std::fs::write(context.join("g"), "plain\n").unwrap();
    let options = |tag: &str| {
        let mut options = options_for(
            &registry,
            &context,
            &work.path().join(format!("kiln-{tag}")),
        );
        options.cache.enabled = true;
        options.cache.repo = Some(format!("{}/cache", registry.addr()));
        options
            .output
            .destinations
            .push(format!("{}/linked:{tag}", registry.addr()));
        options
    };
    let first = build(options("first")).await;
    // The base tag moves to another image.
    image::push_rootfs(&registry, &base_with(work.path(), "two"), "base/app:1");
    let second = build(options("second")).await;
    let cached: Vec<bool> = second
        .iter()
        .filter_map(|e| match e {
            BuildEvent::StepFinished { cached, .. } => Some(*cached),
            _ => None,
        })
        .collect();
    assert_eq!(
        cached,
        [true, false],
        "the linked copy is a hit, the plain copy after it is not: {second:#?}"
    );
    let layer_of = |events: &[BuildEvent]| {
        events.iter().find_map(|e| match e {
            BuildEvent::LayerCreated {
                step: 0, digest, ..
            } => Some(digest.clone()),
            _ => None,
        })
    };
    let made = layer_of(&first).expect("the first build made the linked layer");
    let one = image::flatten(&registry, "linked:first");
    let two = image::flatten(&registry, "linked:second");
    let digests = |flat: &image::Flattened| flat.config["rootfs"]["diff_ids"].clone();
    assert_eq!(
        digests(&one)[1],
        digests(&two)[1],
        "the same linked layer ({made}) on both bases"
    );
    assert!(two.rootfs.join("two").is_file() && !two.rootfs.join("one").exists());
    assert_eq!(
        std::fs::read_to_string(two.rootfs.join("app/f")).unwrap(),
        "linked\n"
    );
    assert_eq!(
        std::fs::read_to_string(two.rootfs.join("app/g")).unwrap(),
        "plain\n"
    );
}

/// A stage that is neither in the image nor cached never leaves the build: its layers are
/// stored uncompressed (the blob's digest is its diff ID), while the image's own layers are
/// compressed as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_that_never_leave_the_build_are_not_compressed() {
    let registry = Registry::start();
    let base = format!("{}/library/busybox:latest", registry.addr());
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {base} AS build\nRUN head -c 300000 /dev/zero > /zeros\n\
             FROM {base}\nCOPY --from=build /zeros /zeros\n"
        ),
    )
    .unwrap();
    let build_with = |cache: bool, tag: &str| {
        let mut options = options_for(&registry, &context, &work.path().join(tag));
        options.cache.enabled = cache;
        options
            .output
            .destinations
            .push(format!("{}/inner:{tag}", registry.addr()));
        options
    };
    let layers = |events: &[BuildEvent], wanted: usize| -> Vec<(bool, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                BuildEvent::LayerCreated {
                    stage,
                    digest,
                    diff_id,
                    size,
                    ..
                } if *stage == wanted => Some((digest == diff_id, *size)),
                _ => None,
            })
            .collect()
    };
    let events = build(build_with(false, "plain")).await;
    let build_stage = layers(&events, 0);
    assert_eq!(build_stage.len(), 1, "{events:#?}");
    assert!(build_stage[0].0, "stored as the plain tar: {build_stage:?}");
    assert!(build_stage[0].1 > 300_000, "{build_stage:?}");
    let image_stage = layers(&events, 1);
    assert!(
        image_stage
            .iter()
            .all(|(plain, size)| !plain && *size < 10_000),
        "the image's layer is compressed: {image_stage:?}"
    );
    let flat = image::flatten(&registry, "inner:plain");
    assert_eq!(
        std::fs::metadata(flat.rootfs.join("zeros")).unwrap().len(),
        300_000
    );

    // With the layer cache on, the build stage's layer is stored in the cache: compressed.
    let events = build(build_with(true, "cached")).await;
    let build_stage = layers(&events, 0);
    assert!(
        build_stage.iter().all(|(plain, _)| !plain),
        "cached layers are compressed: {build_stage:?}"
    );
}

//! `--image-fs-extract-retry`: a base layer blob damaged in the Kiln dir's store (a disk fault,
//! a half-copied volume) fails the unpack once; the damaged blob is dropped, and a retry pulls
//! it again from the registry and builds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_engine::{BuildEvent, BuildOptions, Builder};
use kiln_sandbox::Mode;
use kiln_testkit::{bases, image, Registry};

async fn build(options: BuildOptions) -> (Result<(), String>, Vec<BuildEvent>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let outcome = Builder::new(options)
        .events(Arc::new(move |e: BuildEvent| sink.lock().unwrap().push(e)))
        .build()
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let events = events.lock().unwrap().clone();
    (outcome, events)
}

/// The largest blob in the store: the base's layer (the step's own layer is a few bytes).
fn base_layer_blob(kiln_dir: &Path) -> PathBuf {
    std::fs::read_dir(kiln_dir.join("blobs/blobs/sha256"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .max_by_key(|path| path.metadata().unwrap().len())
        .unwrap()
}

/// Flips one byte in the middle, keeping the size, as a bad sector would.
fn damage(blob: &Path, good: &[u8]) {
    let mut bytes = good.to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(blob, bytes).unwrap();
}

fn warnings(events: &[BuildEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Warning { message } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_base_layer_is_fetched_again_on_retry() {
    damaged_base_layer_case(false).await;
}

/// With bases mounted, a layer tree made once is never read from its blob again; a damaged blob
/// of a layer with no tree yet fails the tree, and the stage falls back to the unpack, retries
/// and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_base_layer_with_no_tree_is_fetched_again_on_retry() {
    damaged_base_layer_case(true).await;
}

async fn damaged_base_layer_case(base_overlay: bool) {
    let registry = Registry::start();
    let base = format!("{}/library/busybox:latest", registry.addr());
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {base}\nRUN echo built > /built\n"),
    )
    .unwrap();
    let kiln_dir = work.path().join("kiln");
    let options = |retries: u32, tag: &str| {
        let mut options = BuildOptions::new(context.to_string_lossy());
        options.mode = Some(Mode::Chroot);
        options.kiln_dir = kiln_dir.clone();
        options.registry.insecure_registries.push(registry.addr());
        options.extract_retries = retries;
        options.snapshot.base_overlay = base_overlay;
        options
            .output
            .destinations
            .push(format!("{}/retried:{tag}", registry.addr()));
        options
    };
    let (first, events) = build(options(0, "first")).await;
    first.unwrap_or_else(|e| panic!("{e}: {events:#?}"));
    let blob = base_layer_blob(&kiln_dir);
    let good = std::fs::read(&blob).unwrap();

    let forget_trees = || {
        let _ = std::fs::remove_dir_all(kiln_dir.join("layers"));
    };
    // Without retries the build fails, and the damaged blob is gone from the store.
    forget_trees();
    damage(&blob, &good);
    let (failed, _) = build(options(0, "failed")).await;
    let message = failed.expect_err("unpacking a damaged layer must fail");
    assert!(message.contains("FROM"), "{message}");
    assert!(!blob.exists(), "the damaged blob is still stored");

    // With one retry the same fault costs a warning and a download.
    forget_trees();
    damage(&blob, &good);
    let (retried, events) = build(options(1, "retried")).await;
    retried.unwrap_or_else(|e| panic!("{e}: {events:#?}"));
    let warned = warnings(&events);
    assert!(
        warned
            .iter()
            .any(|w| w.contains("--image-fs-extract-retry") && w.contains("1 of 1")),
        "{warned:#?}"
    );
    assert_eq!(std::fs::read(&blob).unwrap(), good, "fetched again intact");
    let flat = image::flatten(&registry, "retried:retried");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("built")).unwrap(),
        "built\n"
    );
    assert!(flat.rootfs.join("bin/busybox").exists());
}

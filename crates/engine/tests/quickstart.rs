//! End to end: the README's quickstart context is built with the engine against a real
//! registry, pulled back with skopeo, unpacked with umoci and run with runc.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_engine::{BuildEvent, BuildOptions, Builder};
use kiln_sandbox::Mode;
use kiln_testkit::{bases, image, Registry};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(name)
}

fn options_for(registry: &Registry, context: &Path, kiln_dir: &Path) -> BuildOptions {
    let mut options = BuildOptions::new(context.to_string_lossy());
    options.mode = Some(Mode::Chroot);
    options.kiln_dir = kiln_dir.to_path_buf();
    options
        .registry
        .registry_maps
        .push(("docker.io".into(), vec![registry.addr()]));
    options.registry.insecure_registries.push(registry.addr());
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_builds_pushes_and_runs() {
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "library/busybox:latest");
    let kiln_dir = tempfile::tempdir().unwrap();
    let mut options = options_for(&registry, &testdata("quickstart"), kiln_dir.path());
    let destination = format!("{}/quickstart:1", registry.addr());
    options.output.destinations.push(destination.clone());
    let digest_file = kiln_dir.path().join("digest");
    options.output.digest_file = Some(digest_file.clone());

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let report = Builder::new(options)
        .events(Arc::new(move |e: BuildEvent| sink.lock().unwrap().push(e)))
        .build()
        .await
        .unwrap_or_else(|e| panic!("build failed: {e}\nregistry log:\n{}", registry.log()));

    assert_eq!(
        std::fs::read_to_string(&digest_file).unwrap(),
        report.digest.to_string()
    );
    let events = events.lock().unwrap();
    assert!(events
        .iter()
        .any(|e| matches!(e, BuildEvent::Pushed { .. })));
    assert!(events
        .iter()
        .any(|e| matches!(e, BuildEvent::RunOutput { .. })
            || matches!(e, BuildEvent::StepFinished { .. })));

    let flat = image::flatten(&registry, "quickstart:1");
    assert_eq!(flat.config["config"]["Cmd"][0], "/app/hello.sh");
    let output = image::run_with_runc(&flat);
    assert_eq!(
        output,
        "HELLO FROM A DAEMONLESS BUILD\nbuilt by root in /src\nand hello from kiln\n"
    );
}

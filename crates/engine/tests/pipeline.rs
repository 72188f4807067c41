//! Pipelined push against a real registry: a finished layer of the final image is uploaded
//! while later steps still run; a build that fails afterwards tags nothing.

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
    options
}

/// A context whose COPY makes a layer, followed by a RUN that takes `seconds` and ends with
/// `status`.
fn context(dir: &Path, registry: &Registry, seconds: u32, status: u32) {
    std::fs::write(dir.join("payload.txt"), "pipelined\n".repeat(10_000)).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {}/base/busybox:latest\nCOPY payload.txt /payload.txt\nRUN sleep {seconds}; exit {status}\n",
            registry.addr()
        ),
    )
    .unwrap();
}

fn build(
    registry: &Registry,
    work: &Path,
    destination: &str,
) -> (
    Result<kiln_engine::BuildReport, kiln_engine::BuildError>,
    Vec<BuildEvent>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let kiln_dir = work.join("kiln");
    let mut options = options_for(registry, &work.join("context"), &kiln_dir);
    options.output.destinations.push(destination.to_owned());
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let result = runtime.block_on(
        Builder::new(options)
            .events(Arc::new(move |e: BuildEvent| sink.lock().unwrap().push(e)))
            .build(),
    );
    let events = events.lock().unwrap().clone();
    (result, events)
}

#[test]
fn a_layer_is_uploaded_while_later_steps_run() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("context")).unwrap();
    context(&work.path().join("context"), &registry, 2, 0);
    let destination = format!("{}/out/pipelined:1", registry.addr());
    let (result, events) = build(&registry, work.path(), &destination);
    result.unwrap_or_else(|e| panic!("build failed: {e}"));

    let copy_layer = events
        .iter()
        .find_map(|e| match e {
            BuildEvent::LayerCreated {
                step: 0, digest, ..
            } => Some(digest.clone()),
            _ => None,
        })
        .expect("the COPY made a layer");
    let uploaded = events
        .iter()
        .position(|e| matches!(e, BuildEvent::PushProgress { digest, .. } if *digest == copy_layer))
        .expect("the COPY layer was pushed");
    let run_finished = events
        .iter()
        .position(|e| matches!(e, BuildEvent::StepFinished { step: 1, .. }))
        .expect("the RUN finished");
    assert!(
        uploaded < run_finished,
        "the COPY layer was uploaded only after the RUN that followed it ended"
    );
    let flat = image::flatten(&registry, "out/pipelined:1");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("payload.txt")).unwrap(),
        "pipelined\n".repeat(10_000)
    );
}

#[test]
fn a_build_failing_after_an_upload_tags_nothing() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("context")).unwrap();
    context(&work.path().join("context"), &registry, 1, 3);
    let destination = format!("{}/out/failing:1", registry.addr());
    let (result, _) = build(&registry, work.path(), &destination);
    assert!(result.is_err(), "the RUN fails the build");
    let tags = http_get(&registry, "/v2/out/failing/tags/list");
    assert!(
        !tags.contains("\"1\""),
        "a failed build tagged its destination: {tags}"
    );
}

/// GET over plain HTTP/1.0 with std only: the test needs one small response.
fn http_get(registry: &Registry, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(registry.socket_addr()).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n",
        registry.addr()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// Base layers unpack while they download; a layer the registry serves corrupted fails the
/// build with the digest named, and the unpacker following the download does not hang.
#[test]
fn a_corrupt_base_layer_fails_the_build_without_hanging() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    // Flip bytes in the middle of every layer-sized blob the registry stores.
    let blobs = registry
        .dir()
        .join("storage/docker/registry/v2/blobs/sha256");
    let mut corrupted = 0;
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let data = blob.unwrap().path().join("data");
            let mut bytes = std::fs::read(&data).unwrap();
            if bytes.len() > 100_000 {
                let middle = bytes.len() / 2;
                for b in &mut bytes[middle..middle + 64] {
                    *b ^= 0x5a;
                }
                std::fs::write(&data, bytes).unwrap();
                corrupted += 1;
            }
        }
    }
    assert_eq!(corrupted, 1, "the busybox base has one layer");
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("context")).unwrap();
    context(&work.path().join("context"), &registry, 0, 0);
    let destination = format!("{}/out/corrupt:1", registry.addr());
    let (tx, rx) = std::sync::mpsc::channel();
    let work_path = work.path().to_path_buf();
    std::thread::spawn(move || {
        let (result, _) = build(&registry, &work_path, &destination);
        tx.send(result.map(|_| ()).map_err(|e| e.to_string())).ok();
    });
    let result = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the build ended");
    let error = result.expect_err("a corrupt base layer fails the build");
    assert!(error.contains("FROM"), "{error}");
    assert!(error.contains("sha256:"), "{error}");
}

/// Two stages on the same base, built at the same time: the second follows the first one's
/// download of the base layer, and both trees are complete.
#[test]
fn parallel_stages_on_one_base_share_its_download() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    let base = format!("{}/base/busybox:latest", registry.addr());
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {base} AS one\nRUN ls /bin | wc -l > /count\n\
             FROM {base} AS two\nRUN ls /bin | wc -l > /count\n\
             FROM {base}\nCOPY --from=one /count /one\nCOPY --from=two /count /two\n"
        ),
    )
    .unwrap();
    let destination = format!("{}/out/parallel:1", registry.addr());
    let (result, events) = build(&registry, work.path(), &destination);
    result.unwrap_or_else(|e| panic!("build failed: {e}"));
    let downloads = events
        .iter()
        .filter(|e| matches!(e, BuildEvent::PullProgress { .. }))
        .count();
    assert!(downloads >= 1, "the base layer was downloaded");
    let flat = image::flatten(&registry, "out/parallel:1");
    let one = std::fs::read_to_string(flat.rootfs.join("one")).unwrap();
    let two = std::fs::read_to_string(flat.rootfs.join("two")).unwrap();
    assert_eq!(one, two);
    assert!(
        one.trim().parse::<u32>().unwrap() > 100,
        "busybox's /bin is complete: {one}"
    );
}

//! The layer cache end to end against a real registry: full hits execute and unpack nothing
//! and give the same digest, the cache is shared between work directories (two Pods), an
//! `oci:` cache works without pushing, a changed file re-runs only what follows it, and a base
//! image stored in `--cache-dir` is not pulled again.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kiln_engine::{BuildEvent, BuildOptions, Builder, Phase};
use kiln_sandbox::Mode;
use kiln_testkit::{bases, image, Registry};

fn write_context(dir: &Path, registry: &Registry, greeting: &str) {
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("app/greeting.txt"), greeting).unwrap();
    std::fs::write(dir.join("app/other.txt"), "unchanged\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {}/base/busybox:latest\n\
             RUN echo ran-first > /first\n\
             COPY app/other.txt /app/other.txt\n\
             WORKDIR /work\n\
             COPY app/greeting.txt /app/greeting.txt\n\
             RUN cat /app/greeting.txt > /work/copied && echo ran-last\n\
             CMD [\"cat\", \"/work/copied\"]\n",
            registry.addr()
        ),
    )
    .unwrap();
}

struct Built {
    digest: String,
    events: Vec<BuildEvent>,
}

impl Built {
    fn ran(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                BuildEvent::RunOutput { line, .. } => Some(line.clone()),
                _ => None,
            })
            .collect()
    }

    fn cached_steps(&self) -> Vec<usize> {
        self.events
            .iter()
            .filter_map(|e| match e {
                BuildEvent::StepFinished {
                    step, cached: true, ..
                } => Some(*step),
                _ => None,
            })
            .collect()
    }

    fn pulled_layers(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, BuildEvent::PullProgress { .. }))
            .count()
    }

    fn unpacked(&self) -> bool {
        self.events.iter().any(|e| {
            matches!(
                e,
                BuildEvent::PhaseFinished {
                    phase: Phase::Unpack,
                    ..
                }
            )
        })
    }
}

fn build(
    registry: &Registry,
    context: &Path,
    kiln_dir: &Path,
    configure: impl FnOnce(&mut BuildOptions),
) -> Built {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut options = BuildOptions::new(context.to_string_lossy());
    options.mode = Some(Mode::Chroot);
    options.kiln_dir = kiln_dir.to_path_buf();
    options.registry.insecure_registries.push(registry.addr());
    options.output.reproducible = true;
    configure(&mut options);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let report = runtime
        .block_on(
            Builder::new(options)
                .events(Arc::new(move |e: BuildEvent| sink.lock().unwrap().push(e)))
                .build(),
        )
        .unwrap_or_else(|e| panic!("build failed: {e}\nregistry log:\n{}", registry.log()));
    let events = events.lock().unwrap().clone();
    Built {
        digest: report.digest.to_string(),
        events,
    }
}

#[test]
fn an_unchanged_rebuild_in_another_pod_is_a_full_hit_with_the_same_digest() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci", "runc"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context, &registry, "hello from the cache\n");
    let cache_flags = |tag: &'static str| {
        let addr = registry.addr();
        move |o: &mut BuildOptions| {
            o.cache.enabled = true;
            o.cache.repo = Some(format!("{addr}/team/app/cache"));
            o.output.destinations.push(format!("{addr}/team/app:{tag}"));
            // Not --reproducible: the same digest must come from the cached layers' own
            // times, as with BuildKit, not from a fixed epoch.
            o.output.reproducible = false;
        }
    };

    let cold = build(
        &registry,
        &context,
        &work.path().join("pod-1"),
        cache_flags("1"),
    );
    assert_eq!(
        cold.ran(),
        vec!["ran-last".to_owned()],
        "cold build runs both RUNs"
    );
    assert!(cold.cached_steps().is_empty());

    // A second Pod, a second later (so a build-time timestamp would show): a new work
    // directory, only the registry cache is shared.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let before = registry.requests().len();
    let warm = build(
        &registry,
        &context,
        &work.path().join("pod-2"),
        cache_flags("2"),
    );
    // One round for the cache: the stage record, asked for with the base manifest, answers
    // every step and carries the base config; the manifest goes out first and alone, as an
    // identical build already pushed every blob to this repository.
    let requests: Vec<_> = registry.requests().split_off(before);
    let count = |method: &str, matches: &dyn Fn(&str) -> bool| {
        (requests.iter())
            .filter(|(m, uri)| m == method && matches(uri))
            .count()
    };
    let step_entry = |uri: &str| {
        uri.strip_prefix("/v2/team/app/cache/manifests/")
            .is_some_and(|tag| tag.len() == 64)
    };
    assert_eq!(count("GET", &step_entry), 0, "{requests:?}");
    let record = |uri: &str| uri.starts_with("/v2/team/app/cache/manifests/stage-");
    assert_eq!(count("GET", &record), 1, "{requests:?}");
    assert_eq!(
        count("GET", &|uri| uri.contains("/blobs/")),
        0,
        "{requests:?}"
    );
    assert_eq!(count("HEAD", &|_| true), 0, "{requests:?}");
    assert_eq!(count("PUT", &|_| true), 1, "{requests:?}");
    assert!(
        warm.ran().is_empty(),
        "a full hit runs nothing: {:?}",
        warm.ran()
    );
    assert_eq!(
        warm.cached_steps(),
        vec![0, 1, 2, 3, 4],
        "every layer step is a hit"
    );
    assert_eq!(warm.pulled_layers(), 0, "no base layer is downloaded");
    assert!(!warm.unpacked(), "nothing is unpacked");
    assert_eq!(cold.digest, warm.digest);

    let flat = image::flatten(&registry, "team/app:2");
    assert_eq!(image::run_with_runc(&flat), "hello from the cache\n");

    // A changed file: the steps before it hit, its COPY and the RUN after it run again.
    write_context(&context, &registry, "changed greeting\n");
    let changed = build(
        &registry,
        &context,
        &work.path().join("pod-3"),
        cache_flags("3"),
    );
    assert_eq!(changed.cached_steps(), vec![0, 1, 2]);
    assert_eq!(changed.ran(), vec!["ran-last".to_owned()]);
    assert_ne!(changed.digest, cold.digest);
    let flat = image::flatten(&registry, "team/app:3");
    assert_eq!(image::run_with_runc(&flat), "changed greeting\n");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("first")).unwrap(),
        "ran-first\n",
        "the cached first RUN's layer is in the image"
    );
}

#[test]
fn a_full_hit_pushed_to_a_new_repository_puts_its_blobs_there() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci", "runc"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context, &registry, "to a new repository\n");
    let flags = |destination: &'static str| {
        let addr = registry.addr();
        move |o: &mut BuildOptions| {
            o.cache.enabled = true;
            o.cache.repo = Some(format!("{addr}/shared/cache"));
            o.output.destinations.push(format!("{addr}/{destination}"));
        }
    };
    let cold = build(
        &registry,
        &context,
        &work.path().join("a"),
        flags("one/app:1"),
    );
    // The destination has none of the blobs: the manifest sent first is refused, then the
    // layers are mounted from the cache and base repositories and the config uploaded.
    let before = registry.requests().len();
    let warm = build(
        &registry,
        &context,
        &work.path().join("b"),
        flags("two/app:1"),
    );
    let manifest_puts = (registry.requests().split_off(before).iter())
        .filter(|(method, uri)| method == "PUT" && uri == "/v2/two/app/manifests/1")
        .count();
    assert_eq!(manifest_puts, 2, "refused once, then accepted");
    assert!(warm.ran().is_empty(), "{:?}", warm.ran());
    assert_eq!(warm.digest, cold.digest);
    let flat = image::flatten(&registry, "two/app:1");
    assert_eq!(image::run_with_runc(&flat), "to a new repository\n");
}

#[test]
fn an_oci_layout_cache_works_without_pushing() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context, &registry, "offline\n");
    let cache = work.path().join("oci-cache");
    let layout = work.path().join("out");
    let flags = |o: &mut BuildOptions| {
        o.cache.enabled = true;
        o.cache.repo = Some(format!("oci:{}", cache.display()));
        o.output.no_push = true;
        o.output.oci_layout_path = Some(layout.clone());
    };
    let cold = build(&registry, &context, &work.path().join("a"), flags);
    assert_eq!(cold.ran(), vec!["ran-last".to_owned()]);
    let warm = build(&registry, &context, &work.path().join("b"), flags);
    assert!(warm.ran().is_empty());
    assert_eq!(warm.cached_steps(), vec![0, 1, 2, 3, 4]);
    assert_eq!(cold.digest, warm.digest);
    assert!(cache.join("index.json").is_file());
}

#[test]
fn a_base_in_the_cache_dir_is_not_pulled() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context, &registry, "warm\n");
    let cache_dir = work.path().join("cache-dir");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut registry_options = kiln_registry::RegistryOptions::default();
    registry_options.insecure_registries.push(registry.addr());
    let client = kiln_registry::Client::new(registry_options).unwrap();
    let reference =
        kiln_oci::Reference::parse(&format!("{}/base/busybox:latest", registry.addr())).unwrap();
    let report = runtime
        .block_on(kiln_cache::BaseImageDir::open(&cache_dir).unwrap().warm(
            &client,
            &reference,
            &kiln_oci::Platform::host(),
        ))
        .unwrap();
    assert!(
        report.blobs_fetched >= 3,
        "manifest, config and layer were stored"
    );

    let without = build(&registry, &context, &work.path().join("a"), |o| {
        o.output.no_push = true;
    });
    assert!(
        without.pulled_layers() > 0,
        "without --cache-dir the base layer is pulled"
    );
    let with = build(&registry, &context, &work.path().join("b"), |o| {
        o.output.no_push = true;
        o.cache.dir = Some(cache_dir.clone());
    });
    assert_eq!(
        with.pulled_layers(),
        0,
        "the base layer came from --cache-dir"
    );
    assert_eq!(with.ran(), vec!["ran-last".to_owned()]);
}

/// A fully cached multi-stage build unpacks no stage: `COPY --from` a cached stage is keyed
/// by that stage's key, so neither stage's tree is needed.
#[test]
fn a_cached_multi_stage_build_unpacks_no_stage() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci", "runc"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    let base = format!("{}/base/busybox:latest", registry.addr());
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {base} AS builder\nRUN echo built-in-builder > /artifact\n\
             FROM builder AS tested\nRUN cat /artifact > /tested\n\
             FROM {base}\nCOPY --from=tested /tested /tested\nCMD [\"cat\", \"/tested\"]\n"
        ),
    )
    .unwrap();
    let addr = registry.addr();
    let flags = |tag: &'static str| {
        let addr = addr.clone();
        move |o: &mut BuildOptions| {
            o.cache.enabled = true;
            o.output
                .destinations
                .push(format!("{addr}/multi/app:{tag}"));
        }
    };
    let cold = build(&registry, &context, &work.path().join("a"), flags("1"));
    assert!(cold.unpacked(), "the stage FROM builder copies its tree");
    let warm = build(&registry, &context, &work.path().join("b"), flags("2"));
    assert!(warm.ran().is_empty());
    assert!(!warm.unpacked(), "no stage tree is made");
    assert_eq!(warm.pulled_layers(), 0);
    assert_eq!(warm.digest, cold.digest);
    let flat = image::flatten(&registry, "multi/app:2");
    assert_eq!(image::run_with_runc(&flat), "built-in-builder\n");
}

/// The cache on, pushing to one destination of `registry` (the cache is its `/cache`).
fn cache_flags(registry: &Registry) -> impl Fn(&mut BuildOptions) + '_ {
    move |o: &mut BuildOptions| {
        o.cache.enabled = true;
        o.output.destinations = vec![format!("{}/app/pinned:latest", registry.addr())];
    }
}

/// A registry with the busybox base, an HTTP server and a context whose Dockerfile ADDs the
/// served `payload.txt` (no `--checksum`) and prints it in a RUN; every build is a new Pod.
struct AddFixture {
    registry: Registry,
    work: tempfile::TempDir,
    server: kiln_testkit::http::StaticServer,
}

impl AddFixture {
    fn new(validators: kiln_testkit::http::Validators) -> AddFixture {
        kiln_testkit::require_tools(&["docker-registry", "skopeo", "python3"]);
        let registry = Registry::start();
        image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(work.path().join("served")).unwrap();
        let server =
            kiln_testkit::http::StaticServer::start_with(&work.path().join("served"), validators);
        let context = work.path().join("context");
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(
            context.join("Dockerfile"),
            format!(
                "FROM {}/base/busybox:latest\nADD {}/payload.txt /payload.txt\nRUN cat /payload.txt\n",
                registry.addr(),
                server.url()
            ),
        )
        .unwrap();
        let fixture = AddFixture {
            registry,
            work,
            server,
        };
        fixture.serve("payload-one\n", 1_600_000_000);
        fixture
    }

    /// Replaces the served file, with an mtime whole seconds away from the last one so that
    /// `Last-Modified` (one-second resolution) changes too.
    fn serve(&self, content: &str, mtime: u64) {
        let path = self.work.path().join("served/payload.txt");
        std::fs::write(&path, content).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))
            .unwrap();
    }

    fn build(&self, pod: &str) -> Built {
        build(
            &self.registry,
            &self.work.path().join("context"),
            &self.work.path().join(pod),
            cache_flags(&self.registry),
        )
    }

    fn gets(&self) -> usize {
        (self.server.requests().iter())
            .filter(|r| r.starts_with("GET "))
            .count()
    }
}

#[test]
fn an_add_of_a_url_is_keyed_by_the_servers_validators_and_a_hit_downloads_nothing() {
    use kiln_testkit::http::Validators;
    for validators in [Validators::LastModified, Validators::ContentEtag] {
        let fixture = AddFixture::new(validators);
        let cold = fixture.build("a");
        assert_eq!(cold.ran(), vec!["payload-one".to_owned()], "{validators:?}");
        let before = fixture.server.requests().len();
        let warm = fixture.build("b");
        assert!(warm.ran().is_empty(), "{validators:?}: {:?}", warm.ran());
        assert_eq!(warm.cached_steps(), vec![0, 1], "{validators:?}");
        assert_eq!(cold.digest, warm.digest, "{validators:?}");
        let asked = fixture.server.requests().split_off(before);
        assert_eq!(
            asked,
            vec!["HEAD /payload.txt".to_owned()],
            "{validators:?}"
        );

        fixture.serve("payload-two\n", 1_600_000_100);
        let changed = fixture.build("c");
        assert_eq!(
            changed.ran(),
            vec!["payload-two".to_owned()],
            "{validators:?}"
        );
        assert!(changed.cached_steps().is_empty(), "{validators:?}");
    }
}

#[test]
fn an_add_of_a_url_without_validators_is_keyed_by_its_content_fetched_once() {
    let fixture = AddFixture::new(kiln_testkit::http::Validators::None);
    let cold = fixture.build("a");
    assert_eq!(cold.ran(), vec!["payload-one".to_owned()]);
    assert_eq!(
        fixture.gets(),
        1,
        "the step reuses the download made to key it"
    );
    let warm = fixture.build("b");
    assert!(warm.ran().is_empty(), "{:?}", warm.ran());
    assert_eq!(cold.digest, warm.digest);

    fixture.serve("payload-two\n", 1_600_000_000);
    let changed = fixture.build("c");
    assert_eq!(changed.ran(), vec!["payload-two".to_owned()]);
}

#[test]
fn validators_that_change_before_the_download_leave_the_step_uncached() {
    let fixture = AddFixture::new(kiln_testkit::http::Validators::ChangingEtag);
    let first = fixture.build("a");
    assert_eq!(first.ran(), vec!["payload-one".to_owned()]);
    let warned = warnings(&first)
        .iter()
        .any(|w| w.contains("Dockerfile:2") && w.contains("validators changed"));
    assert!(warned, "{:?}", warnings(&first));
    // Nothing was stored under keys that named other content, so the next build runs again
    // (a stage record written anyway would make it a hit).
    let second = fixture.build("b");
    assert_eq!(second.ran(), vec!["payload-one".to_owned()]);
    assert!(second.cached_steps().is_empty());
}

#[test]
fn a_copy_from_an_image_is_keyed_by_the_digest_its_tag_points_to() {
    image_input_is_keyed_by_the_digest_its_tag_points_to(
        "COPY --from={image} /note.txt /note.txt\nRUN cat /note.txt",
        0,
    );
}

#[test]
fn a_run_mount_from_an_image_is_keyed_by_the_digest_its_tag_points_to() {
    image_input_is_keyed_by_the_digest_its_tag_points_to(
        "RUN echo mounted > /mounted\nRUN --mount=type=bind,from={image},target=/img cat /img/note.txt",
        1,
    );
}

/// `steps` (two steps, `{image}` naming an image that holds `/note.txt`, the second step
/// printing it) are cached as a full hit while the image's tag stays put, and run again once
/// the tag moves to other content; then only the first `steps_before_the_image` stay cached.
fn image_input_is_keyed_by_the_digest_its_tag_points_to(
    steps: &str,
    steps_before_the_image: usize,
) {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let files = work.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("note.txt"), "first image\n").unwrap();
    image::push_rootfs(&registry, &files, "other/files:1");
    let context = work.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    let addr = registry.addr();
    let steps = steps.replace("{image}", &format!("{addr}/other/files:1"));
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {addr}/base/busybox:latest\n{steps}\n"),
    )
    .unwrap();

    let cold = build(
        &registry,
        &context,
        &work.path().join("a"),
        cache_flags(&registry),
    );
    assert_eq!(cold.ran(), vec!["first image".to_owned()]);
    let warm = build(
        &registry,
        &context,
        &work.path().join("b"),
        cache_flags(&registry),
    );
    assert!(warm.ran().is_empty(), "{:?}", warm.ran());
    assert_eq!(warm.cached_steps(), vec![0, 1]);
    assert_eq!(cold.digest, warm.digest);

    std::fs::write(files.join("note.txt"), "second image\n").unwrap();
    image::push_rootfs(&registry, &files, "other/files:1");
    let moved = build(
        &registry,
        &context,
        &work.path().join("c"),
        cache_flags(&registry),
    );
    assert_eq!(moved.ran(), vec!["second image".to_owned()]);
    let unchanged: Vec<usize> = (0..steps_before_the_image).collect();
    assert_eq!(moved.cached_steps(), unchanged);
}

fn warnings(built: &Built) -> Vec<String> {
    built
        .events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Warning { message } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

/// The warnings that name `what` (a registry address).
fn warnings_about(built: &Built, what: &str) -> Vec<String> {
    let mut about = warnings(built);
    about.retain(|w| w.contains(what));
    about
}

#[test]
fn a_cache_that_refuses_writes_or_cannot_be_reached_only_warns() {
    use kiln_testkit::RegistryConfig;
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let read_only = Registry::start_with(RegistryConfig {
        read_only: true,
        ..RegistryConfig::default()
    });
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context, &registry, "cache refuses\n");
    let with_cache = |repo: String, insecure: String| {
        let destination = format!("{}/app/refused:latest", registry.addr());
        move |o: &mut BuildOptions| {
            o.cache.enabled = true;
            o.cache.repo = Some(repo);
            o.registry.insecure_registries.push(insecure);
            o.output.destinations = vec![destination];
        }
    };

    let refused_repo = format!("{}/cache/app", read_only.addr());
    let first = build(
        &registry,
        &context,
        &work.path().join("a"),
        with_cache(refused_repo.clone(), read_only.addr()),
    );
    assert_eq!(first.ran(), vec!["ran-last".to_owned()]);
    // Five entries would be written (five warnings before); the first refusal stops the rest.
    let mut refusals = warnings_about(&first, &read_only.addr());
    refusals.retain(|w| w.contains("could not write"));
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(
        refusals[0].contains("nothing more is written"),
        "{refusals:?}"
    );
    let second = build(
        &registry,
        &context,
        &work.path().join("b"),
        with_cache(refused_repo, read_only.addr()),
    );
    assert_eq!(
        second.ran(),
        vec!["ran-last".to_owned()],
        "nothing was cached"
    );
    assert_eq!(first.digest, second.digest);

    // Nothing listens on this port any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let unreachable = build(
        &registry,
        &context,
        &work.path().join("c"),
        with_cache(format!("{closed}/cache/app"), closed.clone()),
    );
    assert_eq!(unreachable.ran(), vec!["ran-last".to_owned()]);
    assert_eq!(unreachable.digest, first.digest);
    // One warning: after the first request that got no answer the cache is not asked again
    // (no stage record, no entry writes), which would each wait out the retries again.
    let about_cache = warnings_about(&unreachable, &closed);
    assert_eq!(about_cache.len(), 1, "{about_cache:?}");
    assert!(
        about_cache[0].contains("unavailable")
            && about_cache[0].contains("not used for the rest of this build"),
        "{about_cache:?}"
    );
}

#[test]
fn a_cache_that_never_answers_is_given_up_after_the_lookup_deadline() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    // Accepts connections and never says a word, like a black-holed load balancer.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((connection, _)) = silent.accept() {
            held.push(connection);
        }
    });
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context, &registry, "silent cache\n");
    let destination = format!("{}/app/silent:latest", registry.addr());
    let built = build(&registry, &context, &work.path().join("a"), |o| {
        o.cache.enabled = true;
        o.cache.repo = Some(format!("{silent_addr}/cache/app"));
        o.cache.lookup_deadline = std::time::Duration::from_secs(1);
        o.registry.insecure_registries.push(silent_addr.clone());
        o.output.destinations = vec![destination];
    });
    assert_eq!(built.ran(), vec!["ran-last".to_owned()]);
    let about_cache = warnings_about(&built, &silent_addr);
    assert_eq!(about_cache.len(), 1, "{about_cache:?}");
    assert!(
        about_cache[0].contains("did not answer within 1 s"),
        "{about_cache:?}"
    );
}

#[test]
fn a_layer_pushed_to_the_destination_is_mounted_into_the_cache_not_uploaded_again() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write_context(&context, &registry, "uploaded once\n");
    let addr = registry.addr();
    let before = registry.requests().len();
    let cold = build(&registry, &context, &work.path().join("a"), |o| {
        o.cache.enabled = true;
        o.cache.repo = Some(format!("{addr}/team/app/cache"));
        o.output.destinations = vec![format!("{addr}/team/app:1")];
    });
    assert_eq!(cold.ran(), vec!["ran-last".to_owned()]);
    let requests = registry.requests().split_off(before);
    // The digest a blob upload's final PUT names, for uploads into `repo`.
    let uploaded_to = |repo: &str| -> Vec<String> {
        let prefix = format!("/v2/{repo}/blobs/uploads/");
        requests
            .iter()
            .filter(|(method, uri)| method == "PUT" && uri.starts_with(&prefix))
            .filter_map(|(_, uri)| {
                let query = uri.split_once('?')?.1.replace("%3A", ":");
                let digest = query.split('&').find_map(|p| p.strip_prefix("digest="))?;
                Some(digest.to_owned())
            })
            .collect()
    };
    let to_destination = uploaded_to("team/app");
    let to_cache = uploaded_to("team/app/cache");
    assert!(to_destination.len() >= 4, "{requests:?}");
    let twice: Vec<&String> = to_cache
        .iter()
        .filter(|d| to_destination.contains(d))
        .collect();
    assert!(twice.is_empty(), "uploaded to both repositories: {twice:?}");
    let mounts = requests
        .iter()
        .filter(|(method, uri)| {
            method == "POST"
                && uri.starts_with("/v2/team/app/cache/blobs/uploads/")
                && uri.contains("mount=")
        })
        .count();
    assert!(mounts >= 4, "{requests:?}");

    // The cache made that way is complete: another Pod's build is a full hit.
    let warm = build(&registry, &context, &work.path().join("b"), |o| {
        o.cache.enabled = true;
        o.cache.repo = Some(format!("{addr}/team/app/cache"));
        o.output.destinations = vec![format!("{addr}/team/app:2")];
    });
    assert!(warm.ran().is_empty());
    assert_eq!(warm.digest, cold.digest);
}

/// ADD of git repositories (served by a real git daemon): a branch's subdirectory without
/// `.git`, a tag with `--keep-git-dir`; keyed by the commits their refs name, so a rebuild in
/// another Pod is a full hit, and a commit on the branch re-runs only that ADD and what follows.
#[test]
fn an_add_of_a_git_repository_is_keyed_by_the_commit_its_ref_names() {
    use kiln_testkit::git::{git, Daemon};
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "umoci", "git"]);
    let registry = Registry::start();
    image::push_rootfs(&registry, bases::busybox_rootfs(), "base/busybox:latest");
    let work = tempfile::tempdir().unwrap();
    let served = work.path().join("served");
    std::fs::create_dir(&served).unwrap();
    let daemon = Daemon::start(&served);
    let repo = work.path().join("repo");
    std::fs::create_dir_all(repo.join("docs")).unwrap();
    git(&repo, &["init", "-q"]);
    std::fs::write(repo.join("docs/readme.txt"), "docs one\n").unwrap();
    std::fs::write(repo.join("top.txt"), "top\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    git(&repo, &["tag", "-a", "v1", "-m", "release one"]);
    let publish = || {
        let _ = std::fs::remove_dir_all(served.join("app.git"));
        git(
            work.path(),
            &["clone", "-q", "--bare", "repo", "served/app.git"],
        );
    };
    publish();
    let app = daemon.url("app.git");
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {}/base/busybox:latest\n\
             ADD --keep-git-dir=true {app}#v1 /src\n\
             ADD {app}#main:docs /docs/\n\
             RUN cat /docs/readme.txt\n",
            registry.addr()
        ),
    )
    .unwrap();

    let cold = build(
        &registry,
        &context,
        &work.path().join("a"),
        cache_flags(&registry),
    );
    assert_eq!(cold.ran(), vec!["docs one".to_owned()]);
    let flat = image::flatten(&registry, "app/pinned:latest");
    assert_eq!(
        std::fs::read_to_string(flat.rootfs.join("src/top.txt")).unwrap(),
        "top\n"
    );
    assert!(flat.rootfs.join("src/.git").is_dir(), "--keep-git-dir");
    assert!(flat.rootfs.join("docs/readme.txt").is_file());
    assert!(!flat.rootfs.join("docs/.git").exists());
    assert!(
        !flat.rootfs.join("docs/docs").exists(),
        "the subdirectory's contents"
    );
    assert!(!flat.rootfs.join("top.txt").exists());

    let warm = build(
        &registry,
        &context,
        &work.path().join("b"),
        cache_flags(&registry),
    );
    assert!(warm.ran().is_empty(), "{:?}", warm.ran());
    assert_eq!(warm.cached_steps(), vec![0, 1, 2]);
    assert_eq!(warm.digest, cold.digest);

    std::fs::write(repo.join("docs/readme.txt"), "docs two\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "two"]);
    publish();
    let moved = build(
        &registry,
        &context,
        &work.path().join("c"),
        cache_flags(&registry),
    );
    assert_eq!(moved.ran(), vec!["docs two".to_owned()]);
    assert_eq!(moved.cached_steps(), vec![0], "the tag did not move");
}

//! `executor cache prune` end to end: real builds fill a registry cache repository, an OCI
//! layout cache and a `--cache-dir`; old entries are added through kiln-cache with a clock
//! set back (a build cannot be made to have run ten days ago); the executor prunes them,
//! with `--dry-run` first, against a registry with deletes on and one with deletes off; a
//! following build still hits every young entry. Also the command line and the report's
//! wording.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_cache::{
    CacheEntry, CacheKey, CacheStore, Clock, LayerFile, NewEntry, PruneReport, PrunedItem,
    PrunedKind, RefusedDelete, StageLocator, StageRecord, DEFAULT_TTL,
};
use kiln_executor::cli::{parse, Command as Parsed, Env, PruneInvocation};
use kiln_oci::{ContainerConfig, Descriptor, Digest, History, MediaType, Platform};
use kiln_registry::{Client, RegistryOptions, Repository};
use kiln_testkit::{Registry, RegistryConfig};

/// How old the old entries are: past the 72h the tests prune with, within the default TTL.
const OLD: Duration = Duration::from_secs(10 * 24 * 3600);

/// The system clock set back by a fixed time, so what a cache writes with it is that old.
#[derive(Debug)]
struct Behind(Duration);

impl Clock for Behind {
    fn now(&self) -> SystemTime {
        SystemTime::now() - self.0
    }
}

fn executor(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_executor"))
        .args(args)
        // Nothing of the machine running the tests may leak in.
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env_remove("KANIKO_NO_PUSH")
        .output()
        .expect("run executor")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `executor cache prune ARGS`, which must exit with `code`; returns its standard output
/// and error.
fn prune(args: &[String], code: i32) -> (String, String) {
    let mut all = vec!["cache".to_owned(), "prune".to_owned()];
    all.extend(args.iter().cloned());
    let out = executor(&all);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("executor {all:?}:\n{stdout}{stderr}");
    assert_eq!(
        out.status.code(),
        Some(code),
        "{all:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// A build of `FROM base` and two RUN steps with the layer cache in `cache_repo` (and base
/// layers from `cache_dir` when given); returns how many steps came from the cache.
fn build(work: &Path, base: &str, cache_repo: &str, cache_dir: Option<&Path>, run: &str) -> usize {
    let context = work.join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {base}\nRUN echo one > /one\nRUN echo two > /two\n"),
    )
    .unwrap();
    let mut args = vec![
        format!("--context=dir://{}", context.display()),
        "--no-push".to_owned(),
        format!("--kiln-dir={}", work.join(format!("kiln-{run}")).display()),
        "--cache".to_owned(),
        format!("--cache-repo={cache_repo}"),
        "--mode=chroot".to_owned(),
        "--progress=plain".to_owned(),
    ];
    if let Some(dir) = cache_dir {
        args.push(format!("--cache-dir={}", dir.display()));
    }
    let out = executor(&args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "build {run} failed:\n{stderr}");
    stderr.lines().filter(|l| l.ends_with(" CACHED")).count()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> Client {
    Client::new(RegistryOptions {
        retry_initial_delay: Duration::from_millis(20),
        ..RegistryOptions::default()
    })
    .unwrap()
}

/// A real gzip-compressed layer tar holding one file.
fn make_layer(dir: &Path, name: &str) -> LayerFile {
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(name), format!("{name}\n")).unwrap();
    let tar = dir.join(format!("{name}.tar"));
    kiln_testkit::run(
        Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&root)
            .arg(name),
    );
    let diff_id = Digest::sha256_of(&std::fs::read(&tar).unwrap());
    kiln_testkit::run(Command::new("gzip").arg("-nf").arg(&tar));
    let path = PathBuf::from(format!("{}.gz", tar.display()));
    let bytes = std::fs::read(&path).unwrap();
    LayerFile {
        descriptor: Descriptor::new(
            MediaType::OciLayerGzip,
            Digest::sha256_of(&bytes),
            bytes.len() as u64,
        ),
        diff_id,
        path,
        mount_from: None,
    }
}

/// Writes, ten days back, step entries for made-up keys (the first with `layer`) and a stage
/// record holding them; returns the entries and the record's tag.
async fn old_entries(
    cache: &CacheStore,
    layers: Vec<Option<LayerFile>>,
) -> (Vec<CacheEntry>, String) {
    let old = cache.clone().with_clock(Arc::new(Behind(OLD)));
    let mut entries = Vec::new();
    for (n, layer) in layers.into_iter().enumerate() {
        let mut config = ContainerConfig::default();
        config.set_env_var("OLD_STEP", &n.to_string());
        let stored = old
            .store(&NewEntry {
                key: CacheKey::from_digest(Digest::sha256_of(format!("old step {n}").as_bytes())),
                platform: Platform::parse("linux/amd64").unwrap(),
                layer,
                config,
                history: History {
                    created_by: Some(format!("RUN old {n}")),
                    ..History::default()
                },
            })
            .await
            .unwrap();
        entries.push(stored.entry);
    }
    let locator = StageLocator::new([b"an old stage".as_slice()]);
    old.store_stage(
        &locator,
        &StageRecord {
            base: None,
            entries: entries.clone(),
        },
    )
    .await
    .unwrap();
    (entries, locator.tag())
}

/// The names on the report lines that start with `verb` (`removed`, `would remove`).
fn named(stdout: &str, verb: &str) -> BTreeSet<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(verb)?.strip_prefix(' '))
        .filter_map(|rest| {
            let rest = rest
                .strip_prefix("step entry ")
                .or_else(|| rest.strip_prefix("stage record "))
                .or_else(|| rest.strip_prefix("base image "))?;
            Some(rest.split([' ', ',']).next()?.to_owned())
        })
        .collect()
}

#[test]
fn registry_cache_prune_with_a_dry_run_first_then_young_entries_still_hit() {
    let registry = Registry::start();
    let addr = registry.addr();
    kiln_testkit::image::push_rootfs(
        &registry,
        kiln_testkit::bases::busybox_rootfs(),
        "base/busybox:latest",
    );
    let work = tempfile::tempdir().unwrap();
    let cache = format!("{addr}/app/cache");
    let base = format!("{addr}/base/busybox:latest");
    assert_eq!(build(work.path(), &base, &cache, None, "cold"), 0);

    let runtime = runtime();
    let client = client();
    let repo = Repository::new(&addr, "app/cache").unwrap();
    let young_tags: BTreeSet<String> = runtime
        .block_on(client.list_tags(&repo))
        .unwrap()
        .into_iter()
        .collect();
    // Two RUN entries and the stage's record.
    assert_eq!(young_tags.len(), 3, "{young_tags:?}");
    let store = CacheStore::open(&cache, &client, DEFAULT_TTL).unwrap();
    let layer = make_layer(work.path(), "old-layer");
    let (old, record_tag) = runtime.block_on(old_entries(&store, vec![Some(layer), None]));
    let mut old_tags: BTreeSet<String> = old.iter().map(|e| e.key.tag()).collect();
    old_tags.insert(record_tag.clone());

    let args = vec![
        format!("--cache-repo={cache}"),
        "--older-than=72h".to_owned(),
    ];
    let mut dry_args = args.clone();
    dry_args.push("--dry-run".to_owned());
    let (dry, _) = prune(&dry_args, 0);
    assert_eq!(named(&dry, "would remove"), old_tags, "{dry}");
    let summary = dry.lines().last().unwrap();
    assert!(
        summary.starts_with(&format!(
            "dry run, nothing changed: {cache}: would remove 3 (2 step entries, 1 stage record), kept 3"
        )),
        "{summary}"
    );
    let all: BTreeSet<String> = young_tags.union(&old_tags).cloned().collect();
    let listed: BTreeSet<String> = runtime
        .block_on(client.list_tags(&repo))
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(listed, all, "the dry run changed the repository");

    let (stdout, stderr) = prune(&args, 0);
    assert_eq!(named(&stdout, "removed"), old_tags, "{stdout}");
    assert!(
        stdout.contains(&format!("removed stage record {record_tag} (sha256:")),
        "{stdout}"
    );
    assert!(stdout.contains(", 240h0m"), "ages are printed: {stdout}");
    let summary = stdout.lines().last().unwrap();
    assert_eq!(
        summary,
        format!(
            "{cache}: removed 3 (2 step entries, 1 stage record), kept 3, refused 0, failed 0; \
             the registry's garbage collection frees their blobs"
        )
    );
    assert!(!stderr.contains("refused"), "{stderr}");
    for entry in &old {
        let err = runtime
            .block_on(client.get_manifest(&repo, &entry.manifest_digest.to_string()))
            .unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
    }
    let listed: BTreeSet<String> = runtime
        .block_on(client.list_tags(&repo))
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(listed, young_tags);

    // The young entries still serve the same build.
    assert_eq!(build(work.path(), &base, &cache, None, "warm"), 2);
}

#[test]
fn a_registry_refusing_deletes_is_reported_and_the_command_succeeds() {
    let registry = Registry::start_with(RegistryConfig {
        deletes_disabled: true,
        ..RegistryConfig::default()
    });
    let addr = registry.addr();
    let cache = format!("{addr}/app/cache");
    let runtime = runtime();
    let client = client();
    let store = CacheStore::open(&cache, &client, DEFAULT_TTL).unwrap();
    let (old, record_tag) = runtime.block_on(old_entries(&store, vec![None, None]));

    let (stdout, stderr) = prune(
        &[
            format!("--cache-repo={cache}"),
            "--older-than=72h".to_owned(),
        ],
        0,
    );
    let refusals: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("refused: "))
        .collect();
    assert_eq!(refusals.len(), 3, "{stdout}");
    let mut expected: Vec<(String, Digest)> = old
        .iter()
        .map(|e| (e.key.tag(), e.manifest_digest.clone()))
        .collect();
    let record = runtime
        .block_on(client.get_manifest(&Repository::new(&addr, "app/cache").unwrap(), &record_tag))
        .unwrap();
    expected.push((record_tag, record.digest));
    for (tag, digest) in expected {
        let line = refusals
            .iter()
            .find(|l| l.contains(&tag))
            .unwrap_or_else(|| panic!("no refusal for {tag}:\n{stdout}"));
        assert!(
            line.contains(&format!(
                "stays: {addr} answered DELETE /v2/app/cache/manifests/{digest} with 405 Method Not Allowed (UNSUPPORTED: "
            )),
            "{line}"
        );
        assert!(line.contains("UNSUPPORTED"), "{line}");
    }
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .starts_with(&format!("{cache}: removed 0, kept 0, refused 3, failed 0")),
        "{stdout}"
    );
    assert!(
        stderr.contains("the registry refused 3 deletes"),
        "{stderr}"
    );
    assert!(!stderr.contains("error:"), "{stderr}");
    for entry in &old {
        assert!(runtime
            .block_on(store.lookup(&entry.key))
            .unwrap()
            .is_some());
    }
}

/// `(layer descriptor, diff_id)` of a step entry in the layout that has a layer.
fn a_layer_of(layout: &Path) -> (Descriptor, Digest) {
    let oci = kiln_oci::layout::OciLayout::open(layout).unwrap();
    for descriptor in oci.index().unwrap().manifests {
        let (_, manifest) = oci
            .read_manifest(
                descriptor.annotation(kiln_oci::image::ANNOTATION_REF_NAME),
                &Platform::parse("linux/amd64").unwrap(),
            )
            .unwrap();
        if manifest.layers.len() == 1 && manifest.config.media_type == MediaType::OciConfig {
            let config = oci.read_config(&manifest).unwrap();
            return (
                manifest.layers[0].clone(),
                config.rootfs.diff_ids[0].clone(),
            );
        }
    }
    panic!("no step entry with a layer in {}", layout.display());
}

fn blob(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs/sha256").join(digest.hex())
}

/// Sets every blob file under `root` ten days into the past.
fn age_every_blob(root: &Path) {
    for entry in std::fs::read_dir(root.join("blobs/sha256")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(SystemTime::now() - OLD))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn oci_layout_and_cache_dir_prune_keep_what_young_entries_and_images_use() {
    let registry = Registry::start();
    let addr = registry.addr();
    kiln_testkit::image::push_rootfs(
        &registry,
        kiln_testkit::bases::busybox_rootfs(),
        "base/busybox:latest",
    );
    let noenv = kiln_testkit::configured::configured_bases()
        .into_iter()
        .find(|b| b.name == "base-noenv")
        .unwrap();
    kiln_testkit::configured::push_configured(&registry, &noenv, "base/noenv:latest");
    let work = tempfile::tempdir().unwrap();
    let cache_dir = work.path().join("cache-dir");
    let warm = |image: &str| {
        let out = executor(&[
            "warm".to_owned(),
            format!("--image={addr}/{image}"),
            format!("--cache-dir={}", cache_dir.display()),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    };
    // busybox warmed ten days ago; base-noenv, which shares its layer, now.
    warm("base/busybox:latest");
    let old_blobs: Vec<PathBuf> = std::fs::read_dir(cache_dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    age_every_blob(&cache_dir);
    warm("base/noenv:latest");
    let dir = kiln_cache::BaseImageDir::open(&cache_dir).unwrap();
    let platform = Platform::parse("linux/amd64").unwrap();
    let runtime = runtime();
    let client = client();
    let head = |image: &str| {
        let reference = kiln_oci::Reference::parse(&format!("{addr}/{image}")).unwrap();
        runtime
            .block_on(client.head_manifest_ref(&reference))
            .unwrap()
            .unwrap()
            .digest
            .unwrap()
    };
    let (old_image, young_image) = (head("base/busybox:latest"), head("base/noenv:latest"));
    let young = dir.lookup(&young_image, &platform).unwrap().unwrap();
    let shared_layer = young.layers[0].1.clone();
    assert!(old_blobs.contains(&shared_layer));

    let layout = work.path().join("layout");
    let cache_repo = format!("oci:{}", layout.display());
    let base = format!("{addr}/base/noenv:latest");
    assert_eq!(
        build(work.path(), &base, &cache_repo, Some(&cache_dir), "cold"),
        0
    );
    let young_tags: BTreeSet<String> = kiln_oci::layout::OciLayout::open(&layout)
        .unwrap()
        .index()
        .unwrap()
        .manifests
        .iter()
        .map(|d| {
            d.annotation(kiln_oci::image::ANNOTATION_REF_NAME)
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(young_tags.len(), 3, "{young_tags:?}");

    // Old entries: one with a layer of its own, one sharing a young entry's layer.
    let (young_layer, young_diff_id) = a_layer_of(&layout);
    let own = make_layer(work.path(), "only-old");
    let shared = LayerFile {
        descriptor: young_layer.clone(),
        diff_id: young_diff_id,
        path: blob(&layout, &young_layer.digest),
        mount_from: None,
    };
    let store = CacheStore::oci_layout(&layout, DEFAULT_TTL).unwrap();
    let (old, record_tag) =
        runtime.block_on(old_entries(&store, vec![Some(own.clone()), Some(shared)]));
    let mut old_names: BTreeSet<String> = old.iter().map(|e| e.key.tag()).collect();
    old_names.insert(record_tag);
    old_names.insert(old_image.to_string());

    let (stdout, _) = prune(
        &[
            format!("--cache-repo={cache_repo}"),
            format!("--cache-dir={}", cache_dir.display()),
            "--older-than=72h".to_owned(),
        ],
        0,
    );
    assert_eq!(named(&stdout, "removed"), old_names, "{stdout}");
    let summaries: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with(&cache_repo) || l.starts_with(&cache_dir.display().to_string()))
        .collect();
    assert_eq!(summaries.len(), 2, "{stdout}");
    assert!(
        summaries[0].starts_with(&format!(
            "{cache_repo}: removed 3 (2 step entries, 1 stage record), kept 3, refused 0, failed 0; "
        )),
        "{stdout}"
    );
    assert!(
        summaries[1].starts_with(&format!(
            "{}: removed 1 (1 base image), kept 1, refused 0, failed 0; 2 blobs",
            cache_dir.display()
        )),
        "{stdout}"
    );

    // The layout: the old-only layer went, the shared one stayed; index.json holds the young
    // entries alone and every one of them still hits.
    assert!(!blob(&layout, &own.descriptor.digest).exists());
    assert!(blob(&layout, &young_layer.digest).is_file());
    for entry in &old {
        assert!(!blob(&layout, &entry.manifest_digest).exists());
    }
    let tags: BTreeSet<String> = kiln_oci::layout::OciLayout::open(&layout)
        .unwrap()
        .index()
        .unwrap()
        .manifests
        .iter()
        .map(|d| {
            d.annotation(kiln_oci::image::ANNOTATION_REF_NAME)
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(tags, young_tags);
    // The cache dir: busybox's manifest and config went, the layer base-noenv uses stayed.
    assert!(dir.lookup(&old_image, &platform).unwrap().is_none());
    assert!(dir.lookup(&young_image, &platform).unwrap().is_some());
    assert!(shared_layer.is_file());
    let gone: Vec<&PathBuf> = old_blobs.iter().filter(|p| !p.exists()).collect();
    assert_eq!(gone.len(), 2, "{old_blobs:?}");

    assert_eq!(
        build(work.path(), &base, &cache_repo, Some(&cache_dir), "warm"),
        2
    );
}

#[test]
fn what_cannot_be_examined_is_reported_with_the_rest_and_fails_the_command() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let store = CacheStore::oci_layout(&layout, DEFAULT_TTL).unwrap();
    let (old, _) = runtime().block_on(old_entries(&store, vec![None]));
    // A tag whose manifest is gone (a layout damaged by hand, or a full disk).
    let missing = Digest::sha256_of(b"a manifest that was never written");
    kiln_oci::layout::OciLayout::open(&layout)
        .unwrap()
        .tag(
            "broken",
            Descriptor::new(MediaType::OciManifest, missing.clone(), 100),
        )
        .unwrap();

    // A mistyped path is refused before anything is pruned.
    let index = std::fs::read(layout.join("index.json")).unwrap();
    let missing_dir = work.path().join("no-such-cache-dir");
    let (_, stderr) = prune(
        &[
            format!("--cache-repo=oci:{}", layout.display()),
            format!("--cache-dir={}", missing_dir.display()),
            "--older-than=72h".to_owned(),
        ],
        1,
    );
    assert!(
        stderr.contains(&format!(
            "error: --cache-dir {}: no such directory",
            missing_dir.display()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read(layout.join("index.json")).unwrap(), index);
    assert!(!missing_dir.exists());

    let (stdout, stderr) = prune(
        &[
            format!("--cache-repo=oci:{}", layout.display()),
            "--older-than=72h".to_owned(),
        ],
        1,
    );
    // The rest was pruned all the same, and the failure names the tag and the digest.
    assert!(
        named(&stdout, "removed").contains(&old[0].key.tag()),
        "{stdout}"
    );
    let failure = stdout
        .lines()
        .find(|l| l.starts_with("failed: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        failure.contains(":broken") && failure.contains(&missing.to_string()),
        "{failure}"
    );
    assert!(
        stdout.lines().last().unwrap().contains("failed 1"),
        "{stdout}"
    );
    assert!(
        stderr.contains("error: cache prune: 1 failure (see above)"),
        "{stderr}"
    );
}

fn prune_invocation(args: &[&str]) -> Result<PruneInvocation, String> {
    let argv = ["executor", "cache", "prune"]
        .into_iter()
        .chain(args.iter().copied());
    match parse(argv, &Env::new()) {
        Ok(Parsed::CachePrune(prune)) => Ok(*prune),
        Ok(other) => panic!("expected cache prune, got {other:?}"),
        Err(e) => Err(e.message),
    }
}

#[test]
fn the_command_line() {
    let err = prune_invocation(&[]).unwrap_err();
    assert!(
        err.contains("--cache-repo") && err.contains("--cache-dir"),
        "{err}"
    );
    let day = Duration::from_secs(24 * 3600);

    let p = prune_invocation(&["--cache-repo=reg.example/app/cache"]).unwrap();
    assert_eq!(p.cache_repo.as_deref(), Some("reg.example/app/cache"));
    assert_eq!(p.cache_dir, None);
    assert_eq!((p.older_than, p.ttl), (DEFAULT_TTL, DEFAULT_TTL));
    assert!(!p.dry_run);

    let p = prune_invocation(&["--cache-dir", "/cache", "--cache-ttl=24h", "--dry-run"]).unwrap();
    assert_eq!(p.cache_dir, Some(PathBuf::from("/cache")));
    assert_eq!((p.older_than, p.ttl), (day, day));
    assert!(p.dry_run);

    let p = prune_invocation(&[
        "--cache-repo=oci:/layout",
        "--older-than=72h",
        "--cache-ttl=24h",
        "--insecure",
        "--skip-tls-verify",
        "--registry-mirror=mirror.example",
    ])
    .unwrap();
    assert_eq!(p.older_than, 3 * day);
    assert!(p.registry.insecure && p.registry.skip_tls_verify);
    assert_eq!(p.registry.registry_mirrors, ["mirror.example"]);

    let err = prune_invocation(&["--cache-dir=/c", "--older-than=3d"]).unwrap_err();
    assert!(err.starts_with("--older-than \"3d\""), "{err}");
    let err = prune_invocation(&["--cache-dir=/c", "--destination=x"]).unwrap_err();
    assert!(err.contains("--destination"), "{err}");
    let err = parse(["executor", "--no-push", "cache"], &Env::new()).unwrap_err();
    assert!(err.message.contains("subcommands come before"), "{err}");
    assert!(matches!(
        parse(["executor", "cache"], &Env::new()),
        Ok(Parsed::Help(_))
    ));
}

fn item(kind: PrunedKind, name: &str) -> PrunedItem {
    PrunedItem {
        kind,
        name: name.to_owned(),
        digest: Digest::sha256_of(name.as_bytes()),
        age: Duration::from_secs(240 * 3600 + 5),
    }
}

fn report(dry_run: bool, bytes_freed: Option<u64>) -> PruneReport {
    PruneReport {
        location: "127.0.0.1:5000/app/cache".into(),
        dry_run,
        removed: vec![
            item(PrunedKind::StepEntry, "aa"),
            item(PrunedKind::StepEntry, "bb"),
            item(PrunedKind::StageRecord, "stage-cc"),
        ],
        refused: Vec::new(),
        failed: Vec::new(),
        kept: 2,
        other: 1,
        blobs_removed: 0,
        bytes_freed,
    }
}

#[test]
fn durations_read_as_go_prints_them() {
    assert_eq!(
        kiln_executor::prune::go_duration(Duration::from_secs(5)),
        "5s"
    );
    assert_eq!(
        kiln_executor::prune::go_duration(Duration::from_secs(125)),
        "2m5s"
    );
    assert_eq!(
        kiln_executor::prune::go_duration(Duration::from_secs(72 * 3600)),
        "72h0m0s"
    );
}

#[test]
fn items_then_a_summary() {
    let lines = kiln_executor::prune::report_lines(&report(false, None));
    assert_eq!(lines.len(), 4);
    assert!(
        lines[0].starts_with("removed step entry aa (sha256:"),
        "{}",
        lines[0]
    );
    assert!(lines[0].ends_with(", 240h0m5s old"), "{}", lines[0]);
    assert_eq!(
        lines[3],
        "127.0.0.1:5000/app/cache: removed 3 (2 step entries, 1 stage record), kept 2, \
         left 1 other tag alone, refused 0, failed 0; the registry's garbage collection \
         frees their blobs"
    );
    let lines = kiln_executor::prune::report_lines(&report(true, Some(2500)));
    assert!(lines[0].starts_with("would remove step entry aa"));
    assert_eq!(
        lines[3],
        "dry run, nothing changed: 127.0.0.1:5000/app/cache: would remove 3 (2 step \
         entries, 1 stage record), kept 2, left 1 other tag alone, refused 0, failed 0; \
         0 blobs (2.5 kB) would be freed"
    );
}

#[test]
fn refusals_name_the_registry_request_and_status() {
    let mut report = report(false, None);
    let refused = report.removed.remove(0);
    report.refused.push(RefusedDelete {
        request: format!("DELETE /v2/app/cache/manifests/{}", refused.digest),
        item: refused,
        registry: "127.0.0.1:5000".into(),
        status: 405,
        message: "405 Method Not Allowed (UNSUPPORTED: The operation is unsupported.)".into(),
    });
    let lines = kiln_executor::prune::report_lines(&report);
    let line = lines.iter().find(|l| l.starts_with("refused:")).unwrap();
    assert!(
        line.starts_with(
            "refused: step entry aa stays: 127.0.0.1:5000 answered DELETE /v2/app/cache/manifests/sha256:"
        ),
        "{line}"
    );
    assert!(
        line.ends_with(" with 405 Method Not Allowed (UNSUPPORTED: The operation is unsupported.)"),
        "{line}"
    );
    assert!(lines.last().unwrap().contains("refused 1"));
}

#[test]
fn layer_trees_removed_and_in_use_then_a_summary() {
    use kiln_fs::trees::{PrunedTree, TreePruneReport};
    let tree = |n: &[u8], unused: u64, bytes: u64| PrunedTree {
        diff_id: Digest::sha256_of(n),
        unused_for: Duration::from_secs(unused),
        bytes,
    };
    let report = TreePruneReport {
        dir: PathBuf::from("/kiln/layers"),
        dry_run: false,
        removed: vec![tree(b"old", 3 * 3600 + 5, 2_500_000)],
        in_use: vec![tree(b"held", 0, 0)],
        kept: 2,
        leftovers: 1,
        failed: vec!["layer tree store /kiln/layers/x: Permission denied".to_owned()],
    };
    let old = Digest::sha256_of(b"old");
    let held = Digest::sha256_of(b"held");
    assert_eq!(
        kiln_executor::prune::tree_report_lines(&report),
        [
            format!("removed layer tree {old} (2.5 MB), unused for 3h0m5s"),
            format!(
                "in use: layer tree {held} stays (a running build holds it), last taken 0s ago"
            ),
            "failed: layer tree store /kiln/layers/x: Permission denied".to_owned(),
            "/kiln/layers: removed 1 layer tree (2.5 MB), kept 1 in use and 2 used more recently, removed 1 left half-made or half-deleted, failed 1".to_owned(),
        ]
    );
    let dry = TreePruneReport {
        dry_run: true,
        in_use: Vec::new(),
        leftovers: 0,
        failed: Vec::new(),
        ..report
    };
    assert_eq!(
        kiln_executor::prune::tree_report_lines(&dry),
        [
            format!("would remove layer tree {old} (2.5 MB), unused for 3h0m5s"),
            "dry run, nothing changed: /kiln/layers: would remove 1 layer tree (2.5 MB), kept 0 in use and 2 used more recently, failed 0".to_owned(),
        ]
    );
}

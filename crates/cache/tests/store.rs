//! The cache backends against real parts: a `docker-registry` on a loopback port, OCI layouts
//! checked with skopeo, two stores ("two Pods") sharing one cache.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kiln_cache::{
    BaseImageDir, CacheEntry, CacheKey, CacheStore, KeyChain, LayerFile, NewEntry, Parent,
    StepInput, DEFAULT_TTL,
};
use kiln_oci::{ContainerConfig, Digest, History, Platform, Reference};
use kiln_plan::ConfigEdit;
use kiln_registry::{
    Client, FileSource, PushBlobOptions, PushOutcome, RegistryOptions, Repository,
};
use kiln_testkit::Registry;

mod support;
use support::{make_layer, Ahead};
use tokio::io::AsyncReadExt as _;

fn platform() -> Platform {
    Platform::parse("linux/amd64").unwrap()
}

fn client() -> Client {
    Client::new(RegistryOptions {
        retry_initial_delay: Duration::from_millis(20),
        ..RegistryOptions::default()
    })
    .unwrap()
}

/// The key of the `n`th step of a made-up stage.
fn key(n: usize) -> CacheKey {
    let mut chain = KeyChain::new(Parent::Image(Digest::sha256_of(b"base")), platform());
    let mut key = None;
    for i in 0..=n {
        key = Some(chain.next_key(&StepInput::Config(ConfigEdit::WorkingDir(format!("/s{i}")))));
    }
    key.unwrap()
}

fn new_entry(key: CacheKey, layer: Option<LayerFile>, env: &str) -> NewEntry {
    let mut config = ContainerConfig::default();
    config.set_env_var("STEP", env);
    config.working_dir = Some("/work".into());
    NewEntry {
        key,
        platform: platform(),
        history: History {
            created_by: Some(format!("RUN make {env}")),
            ..History::default()
        },
        layer,
        config,
    }
}

async fn layer_bytes(store: &CacheStore, entry: &CacheEntry) -> Vec<u8> {
    let mut reader = store
        .open_layer(entry.layer.as_ref().expect("entry has a layer"))
        .await
        .unwrap();
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).await.unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_entry_written_by_one_pod_is_read_by_another() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layer = make_layer(work.path(), "app", "hello from a cached step\n");

    // The build pushed the layer to its destination first; the cache entry mounts it.
    let destination = Repository::new(registry.addr(), "team/app").unwrap();
    let first_pod = client();
    first_pod
        .push_blob(
            &destination,
            &FileSource::new(&layer.path).await.unwrap(),
            &PushBlobOptions {
                digest: Some(layer.descriptor.digest.clone()),
                mount_from: None,
            },
        )
        .await
        .unwrap();
    let repo = format!("{}/team/app/cache", registry.addr());
    let writer = CacheStore::open(&repo, &first_pod, DEFAULT_TTL).unwrap();
    assert_eq!(writer.location(), repo);
    let with_layer = writer
        .store(&new_entry(
            key(0),
            Some(LayerFile {
                mount_from: Some(destination.clone()),
                ..layer.clone()
            }),
            "one",
        ))
        .await
        .unwrap();
    // The layer was already in the destination: mounted, not uploaded a second time.
    assert_eq!(with_layer.layer_transfer, Some(PushOutcome::Mounted));
    let with_layer = with_layer.entry;
    let metadata_only = writer.store(&new_entry(key(1), None, "two")).await.unwrap();
    assert_eq!(metadata_only.layer_transfer, None);
    let metadata_only = metadata_only.entry;
    // Storing the same layer again (another step, same content) sends nothing.
    let again = writer
        .store(&new_entry(key(3), Some(layer.clone()), "three"))
        .await
        .unwrap();
    assert_eq!(again.layer_transfer, Some(PushOutcome::AlreadyPresent));

    // A second Pod: its own client and store, same repository.
    let second_pod = client();
    let reader = CacheStore::open(&repo, &second_pod, DEFAULT_TTL).unwrap();
    let hit = reader.lookup(&key(0)).await.unwrap().expect("hit");
    assert_eq!(hit, with_layer);
    assert_eq!(hit.config.env_var("STEP"), Some("one"));
    assert_eq!(hit.config.working_dir.as_deref(), Some("/work"));
    assert_eq!(hit.history.created_by.as_deref(), Some("RUN make one"));
    assert!(!hit.history.empty_layer);
    let cached = hit.layer.as_ref().unwrap();
    assert_eq!(cached.descriptor.digest, layer.descriptor.digest);
    assert_eq!(cached.diff_id, layer.diff_id);
    assert_eq!(
        layer_bytes(&reader, &hit).await,
        std::fs::read(&layer.path).unwrap()
    );

    let meta = reader.lookup(&key(1)).await.unwrap().expect("hit");
    assert_eq!(meta, metadata_only);
    assert!(meta.layer.is_none());
    assert!(meta.history.empty_layer);
    assert!(reader.lookup(&key(2)).await.unwrap().is_none());

    // The entry is an ordinary image other tools understand.
    if kiln_testkit::which("skopeo").is_some() {
        let out = Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--config"])
            .arg(format!("docker://{repo}:{}", key(0).tag()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(config["config"]["Env"][0], "STEP=one");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_registry_entry_is_a_miss() {
    let registry = Registry::start();
    let repo = format!("{}/ttl/cache", registry.addr());
    let client = client();
    let store = CacheStore::open(&repo, &client, DEFAULT_TTL).unwrap();
    store.store(&new_entry(key(0), None, "old")).await.unwrap();
    // Ages are whole seconds: seen 3 s later the entry is at least 3 s old, past a 2 s TTL,
    // while a rewritten entry stays fresh for the 2 s a slow machine may need to read it back.
    let short = CacheStore::open(&repo, &client, Duration::from_secs(2))
        .unwrap()
        .with_clock(Arc::new(Ahead(Duration::from_secs(3))));
    assert!(short.lookup(&key(0)).await.unwrap().is_none());
    assert!(store.lookup(&key(0)).await.unwrap().is_some());
    // Rewriting the entry makes it fresh again.
    short.store(&new_entry(key(0), None, "new")).await.unwrap();
    let fresh = short.lookup(&key(0)).await.unwrap().expect("hit");
    assert_eq!(fresh.config.env_var("STEP"), Some("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_reads_the_entry_config_from_its_manifest() {
    let registry = Registry::start();
    let repo = format!("{}/inline/cache", registry.addr());
    let client = client();
    let store = CacheStore::open(&repo, &client, DEFAULT_TTL).unwrap();
    let written = store
        .store(&new_entry(key(0), None, "inline"))
        .await
        .unwrap();
    // The config blob is still stored, for tools that ignore the manifest's copy...
    let manifest = client
        .get_manifest(
            &Repository::new(registry.addr(), "inline/cache").unwrap(),
            &key(0).tag(),
        )
        .await
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap();
    let config_digest = Digest::parse(manifest["config"]["digest"].as_str().unwrap()).unwrap();
    assert!(manifest["config"]["data"].is_string(), "{manifest}");
    // ...but a lookup does not fetch it: unlinked from the repository, the entry still hits.
    let link = registry
        .dir()
        .join("storage/docker/registry/v2/repositories/inline/cache/_layers/sha256")
        .join(config_digest.hex())
        .join("link");
    std::fs::remove_file(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display()));
    let hit = store.lookup(&key(0)).await.unwrap().expect("hit");
    assert_eq!(hit, written.entry);
    assert_eq!(hit.config.env_var("STEP"), Some("inline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_keys_of_a_stage_are_probed_concurrently() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let repo = format!("{}/many/cache", registry.addr());
    let client = client();
    let store = CacheStore::open(&repo, &client, DEFAULT_TTL).unwrap();
    const N: usize = 24;
    let layers: Vec<LayerFile> = (0..N)
        .map(|i| make_layer(work.path(), &format!("f{i}"), &format!("content {i}\n")))
        .collect();
    // Even steps have layers, odd steps are metadata-only; every third key is never stored.
    let writes = (0..N).filter(|i| i % 3 != 2).map(|i| {
        let layer = (i % 2 == 0).then(|| layers[i].clone());
        let store = store.clone();
        async move { store.store(&new_entry(key(i), layer, &i.to_string())).await }
    });
    for written in futures::future::join_all(writes).await {
        written.unwrap();
    }

    let keys: Vec<CacheKey> = (0..N).map(key).collect();
    let started = std::time::Instant::now();
    let results = store.lookup_all(&keys).await;
    eprintln!("lookup of {N} keys took {:?}", started.elapsed());
    assert_eq!(results.len(), N);
    for (i, result) in results.into_iter().enumerate() {
        let entry = result.unwrap();
        if i % 3 == 2 {
            assert!(entry.is_none(), "key {i} was never stored");
            continue;
        }
        let entry = entry.unwrap_or_else(|| panic!("key {i} missed"));
        assert_eq!(entry.key, keys[i]);
        assert_eq!(entry.config.env_var("STEP"), Some(i.to_string().as_str()));
        assert_eq!(
            entry.layer.as_ref().map(|l| &l.descriptor.digest),
            (i % 2 == 0).then_some(&layers[i].descriptor.digest)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_layout_cache_round_trip() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cache");
    let layer = make_layer(work.path(), "app", "layout layer\n");
    let client = client();
    let value = format!("oci:{}", dir.display());
    let writer = CacheStore::open(&value, &client, DEFAULT_TTL).unwrap();
    assert!(writer.repository().is_none());
    let stored = writer
        .store(&new_entry(key(0), Some(layer.clone()), "one"))
        .await
        .unwrap();
    assert_eq!(stored.layer_transfer, Some(PushOutcome::Uploaded));
    let stored = stored.entry;
    writer.store(&new_entry(key(1), None, "two")).await.unwrap();

    let reader = CacheStore::open(&value, &client, DEFAULT_TTL).unwrap();
    let hit = reader.lookup(&key(0)).await.unwrap().expect("hit");
    assert_eq!(hit, stored);
    assert_eq!(
        layer_bytes(&reader, &hit).await,
        std::fs::read(&layer.path).unwrap()
    );
    let meta = reader.lookup(&key(1)).await.unwrap().expect("hit");
    assert!(meta.layer.is_none());
    assert!(reader.lookup(&key(5)).await.unwrap().is_none());

    // A tag that names some other manifest is never taken for the key's entry.
    let layout = kiln_oci::layout::OciLayout::open(&dir).unwrap();
    let other = layout.resolve(Some(&key(0).tag())).unwrap();
    layout.tag(&key(7).tag(), other).unwrap();
    let err = reader.lookup(&key(7)).await.unwrap_err();
    assert!(
        matches!(err, kiln_cache::CacheError::InvalidEntry { .. }),
        "{err}"
    );

    // A corrupted layer blob fails the read instead of passing as the cached layer.
    let blob = dir.join("blobs/sha256").join(layer.descriptor.digest.hex());
    let mut corrupted = std::fs::read(&blob).unwrap();
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0xff;
    std::fs::write(&blob, &corrupted).unwrap();
    let mut stream = reader
        .open_layer(hit.layer.as_ref().unwrap())
        .await
        .unwrap();
    let mut sink = Vec::new();
    let err = stream.read_to_end(&mut sink).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");

    // Seen a second later, every entry is past a zero TTL.
    let expiring = CacheStore::oci_layout(&dir, Duration::ZERO)
        .unwrap()
        .with_clock(Arc::new(Ahead(Duration::from_secs(1))));
    assert!(expiring.lookup(&key(0)).await.unwrap().is_none());

    if kiln_testkit::which("skopeo").is_some() {
        let out = Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}:{}", dir.display(), key(0).tag()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn two_writers_share_one_oci_layout_cache() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("shared-cache");
    const PER_WRITER: usize = 20;
    let layers: Vec<LayerFile> = (0..2 * PER_WRITER)
        .map(|i| {
            make_layer(
                work.path(),
                &format!("w{i}"),
                &format!("writer layer {i}\n"),
            )
        })
        .collect();
    // Two independent runtimes and stores, as two builds in two processes would have.
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let dir = dir.clone();
            let layers = layers.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let store = CacheStore::oci_layout(&dir, DEFAULT_TTL).unwrap();
                    let writes = (0..PER_WRITER).map(|n| {
                        let i = w * PER_WRITER + n;
                        let store = store.clone();
                        let layer = layers[i].clone();
                        async move {
                            store
                                .store(&new_entry(key(i), Some(layer), &i.to_string()))
                                .await
                        }
                    });
                    for result in futures::future::join_all(writes).await {
                        result.unwrap();
                    }
                })
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = CacheStore::oci_layout(&dir, DEFAULT_TTL).unwrap();
        let keys: Vec<CacheKey> = (0..2 * PER_WRITER).map(key).collect();
        for (i, result) in store.lookup_all(&keys).await.into_iter().enumerate() {
            let entry = result
                .unwrap()
                .unwrap_or_else(|| panic!("entry {i} was lost"));
            assert_eq!(
                entry.layer.unwrap().descriptor.digest,
                layers[i].descriptor.digest
            );
        }
    });
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2 * PER_WRITER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_fills_the_cache_dir_and_a_second_warm_is_a_no_op() {
    let registry = Registry::start();
    let pushed = kiln_testkit::image::push_rootfs(
        &registry,
        kiln_testkit::bases::busybox_rootfs(),
        "base/busybox:latest",
    );
    let reference = Reference::parse(&format!("{}/base/busybox:latest", registry.addr())).unwrap();
    let work = tempfile::tempdir().unwrap();
    let client = client();

    // Two warmers sharing a directory at the same time.
    let dir_a = BaseImageDir::open(work.path().join("cache-dir")).unwrap();
    let dir_b = BaseImageDir::open(work.path().join("cache-dir")).unwrap();
    let amd64 = platform();
    let (a, b) = tokio::join!(
        dir_a.warm(&client, &reference, &amd64),
        dir_b.warm(&client, &reference, &amd64)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.manifest_digest, b.manifest_digest);
    assert!(pushed.contains(a.digest.hex()), "{pushed} vs {}", a.digest);
    // Between them they fetched the manifest, config and layer (who got which depends on timing).
    assert!(a.blobs_fetched + b.blobs_fetched >= 3, "{a:?} {b:?}");

    let image = dir_a
        .lookup(&a.digest, &platform())
        .unwrap()
        .expect("the warmed image is complete");
    assert_eq!(image.manifest_digest, a.manifest_digest);
    assert!(!image.layers.is_empty());
    for (descriptor, path) in &image.layers {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(Digest::sha256_of(&bytes), descriptor.digest);
    }
    assert_eq!(image.config.rootfs.diff_ids.len(), image.layers.len());
    // No partial downloads are left behind.
    assert_eq!(
        std::fs::read_dir(work.path().join("cache-dir/ingest"))
            .unwrap()
            .count(),
        0
    );

    let again = dir_a.warm(&client, &reference, &platform()).await.unwrap();
    assert_eq!(again.blobs_fetched, 0);
    assert_eq!(again.bytes_fetched, 0);
    assert_eq!(again.manifest_digest, a.manifest_digest);

    // By digest, a complete image needs no registry at all.
    let by_digest =
        Reference::parse(&format!("{}/base/busybox@{}", registry.addr(), a.digest)).unwrap();
    drop(registry);
    let offline = dir_b.warm(&client, &by_digest, &platform()).await.unwrap();
    assert_eq!(offline.blobs_fetched, 0);

    // A missing layer makes the image incomplete, so lookups miss instead of half-succeeding.
    std::fs::remove_file(&image.layers[0].1).unwrap();
    assert!(dir_a.lookup(&a.digest, &platform()).unwrap().is_none());
}

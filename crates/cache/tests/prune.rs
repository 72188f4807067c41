//! Retention against real parts: old step entries and stage records deleted from a loopback
//! `docker-registry` with deletes on, refusals reported by one with deletes off, an OCI layout
//! losing old entries and exactly the blobs nothing else uses, and a `--cache-dir` losing an
//! old base image but not the layer a younger one shares.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_cache::{
    BaseImageDir, CacheEntry, CacheKey, CacheStore, KeyChain, LayerFile, NewEntry, Parent,
    PruneOptions, PruneReport, PrunedKind, StageLocator, StageRecord, StepInput, DEFAULT_TTL,
};
use kiln_oci::image::JsonBlob;
use kiln_oci::{
    ContainerConfig, Digest, History, ImageConfig, ImageFormat, ManifestBuilder, Platform,
    Reference,
};
use kiln_plan::ConfigEdit;
use kiln_registry::{BytesSource, Client, PushBlobOptions, RegistryOptions, Repository};
use kiln_testkit::{Registry, RegistryConfig};
use tokio::io::AsyncReadExt as _;

mod support;
use support::{make_layer, make_old, Behind};

/// How old the old things are: past the 72h cutoff the tests prune with, within the TTL.
const OLD: Duration = Duration::from_secs(10 * 24 * 3600);
const CUTOFF: Duration = Duration::from_secs(72 * 3600);

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

fn key(n: usize) -> CacheKey {
    let mut chain = KeyChain::new(Parent::Image(Digest::sha256_of(b"prune base")), platform());
    let mut key = None;
    for i in 0..=n {
        key = Some(chain.next_key(&StepInput::Config(ConfigEdit::WorkingDir(format!("/p{i}")))));
    }
    key.unwrap()
}

fn locator(name: &str) -> StageLocator {
    StageLocator::new([name.as_bytes()])
}

async fn store(cache: &CacheStore, n: usize, layer: Option<&LayerFile>) -> CacheEntry {
    let mut config = ContainerConfig::default();
    // Distinct per entry, so no two entries share a config blob.
    config.set_env_var("STEP", &n.to_string());
    cache
        .store(&NewEntry {
            key: key(n),
            platform: platform(),
            layer: layer.cloned(),
            config,
            history: History {
                created_by: Some(format!("RUN step {n}")),
                ..History::default()
            },
        })
        .await
        .unwrap()
        .entry
}

async fn record(cache: &CacheStore, name: &str, entries: Vec<CacheEntry>) {
    cache
        .store_stage(
            &locator(name),
            &StageRecord {
                base: None,
                entries,
            },
        )
        .await
        .unwrap();
}

fn prune_options(dry_run: bool) -> PruneOptions {
    PruneOptions {
        older_than: CUTOFF,
        dry_run,
    }
}

/// The report's removed items as `(kind, name)`.
fn removed(report: &PruneReport) -> Vec<(PrunedKind, String)> {
    report
        .removed
        .iter()
        .map(|i| (i.kind, i.name.clone()))
        .collect()
}

fn assert_old_ages(report: &PruneReport) {
    for item in &report.removed {
        assert!(
            item.age >= OLD && item.age < OLD + Duration::from_secs(120),
            "{item:?}"
        );
    }
}

/// An image that is not a cache entry (no Kiln annotations), as a user or another tool might
/// push into the repository.
fn foreign_image() -> (JsonBlob, JsonBlob) {
    let config = ImageConfig::new(&platform())
        .to_blob(ImageFormat::Oci)
        .unwrap();
    let manifest = ManifestBuilder::new(ImageFormat::Oci)
        .config(&config)
        .build()
        .and_then(|m| m.to_blob())
        .unwrap();
    (config, manifest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_prune_deletes_old_entries_and_records_and_keeps_the_rest() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let shared = make_layer(
        work.path(),
        "shared",
        "a layer old and young entries share\n",
    );
    let client = client();
    let repo = Repository::new(registry.addr(), "prune/cache").unwrap();
    let young = CacheStore::open(&repo.to_string(), &client, DEFAULT_TTL).unwrap();
    let old = young.clone().with_clock(Arc::new(Behind(OLD)));

    let old_with_layer = store(&old, 0, Some(&shared)).await;
    let old_metadata = store(&old, 1, None).await;
    record(&old, "old stage", vec![old_with_layer.clone()]).await;
    let young_with_layer = store(&young, 2, Some(&shared)).await;
    store(&young, 3, None).await;
    record(&young, "young stage", vec![young_with_layer]).await;
    let (config, manifest) = foreign_image();
    client
        .push_blob(
            &repo,
            &BytesSource(config.bytes.clone().into()),
            &PushBlobOptions {
                digest: Some(config.digest.clone()),
                mount_from: None,
            },
        )
        .await
        .unwrap();
    client
        .put_manifest(&repo, "latest", &manifest.media_type, manifest.bytes.into())
        .await
        .unwrap();

    let mut expected = vec![
        (PrunedKind::StepEntry, key(0).tag()),
        (PrunedKind::StepEntry, key(1).tag()),
        (PrunedKind::StageRecord, locator("old stage").tag()),
    ];
    expected.sort();
    let check = |report: &PruneReport| {
        assert_eq!(removed(report), expected, "{report:?}");
        assert_eq!(report.kept, 3, "{report:?}");
        assert_eq!(report.other, 1, "{report:?}");
        assert!(
            report.refused.is_empty() && report.failed.is_empty(),
            "{report:?}"
        );
        assert_eq!(report.bytes_freed, None);
        assert_old_ages(report);
    };

    // A dry run names the same entries and deletes nothing.
    let dry = young.prune(&prune_options(true)).await.unwrap();
    assert!(dry.dry_run);
    check(&dry);
    assert!(young.lookup(&key(0)).await.unwrap().is_some());
    assert!(young
        .lookup_stage(&locator("old stage"))
        .await
        .unwrap()
        .is_some());

    let report = young.prune(&prune_options(false)).await.unwrap();
    check(&report);
    assert_eq!(report.location, repo.to_string());
    assert_eq!(report.removed[0].digest, old_with_layer.manifest_digest);
    assert_eq!(report.removed[1].digest, old_metadata.manifest_digest);
    for item in &report.removed {
        for reference in [item.digest.to_string(), item.name.clone()] {
            let err = client.get_manifest(&repo, &reference).await.unwrap_err();
            assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
        }
    }
    assert!(young.lookup(&key(1)).await.unwrap().is_none());
    assert!(young
        .lookup_stage(&locator("old stage"))
        .await
        .unwrap()
        .is_none());
    // The young entries still hit, the shared layer with them (blobs are the registry's GC's).
    let hit = young.lookup(&key(2)).await.unwrap().expect("young entry");
    let mut reader = young.open_layer(hit.layer.as_ref().unwrap()).await.unwrap();
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).await.unwrap();
    assert_eq!(bytes, std::fs::read(&shared.path).unwrap());
    assert!(young.lookup(&key(3)).await.unwrap().is_some());
    let record = young.lookup_stage(&locator("young stage")).await.unwrap();
    assert_eq!(record.expect("young record").entries.len(), 1);
    assert!(client.get_manifest(&repo, "latest").await.is_ok());

    // Nothing left to do.
    let again = young.prune(&prune_options(false)).await.unwrap();
    assert!(again.removed.is_empty(), "{again:?}");
    assert_eq!((again.kept, again.other), (3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_refuses_deletes_is_reported_and_the_prune_goes_on() {
    let registry = Registry::start_with(RegistryConfig {
        deletes_disabled: true,
        ..RegistryConfig::default()
    });
    let client = client();
    let repo = Repository::new(registry.addr(), "refusing/cache").unwrap();
    let young = CacheStore::open(&repo.to_string(), &client, DEFAULT_TTL).unwrap();
    let old = young.clone().with_clock(Arc::new(Behind(OLD)));
    let entries = vec![store(&old, 0, None).await, store(&old, 1, None).await];
    record(&old, "old stage", entries).await;
    store(&young, 2, None).await;

    let report = young.prune(&prune_options(false)).await.unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.kept, 1);
    let refused: Vec<(PrunedKind, String)> = report
        .refused
        .iter()
        .map(|r| (r.item.kind, r.item.name.clone()))
        .collect();
    let mut expected = vec![
        (PrunedKind::StepEntry, key(0).tag()),
        (PrunedKind::StepEntry, key(1).tag()),
        (PrunedKind::StageRecord, locator("old stage").tag()),
    ];
    expected.sort();
    assert_eq!(refused, expected);
    for refusal in &report.refused {
        assert_eq!(refusal.status, 405, "{refusal:?}");
        assert_eq!(refusal.registry, registry.addr());
        assert_eq!(
            refusal.request,
            format!(
                "DELETE /v2/refusing/cache/manifests/{}",
                refusal.item.digest
            )
        );
        assert!(refusal.message.contains("UNSUPPORTED"), "{refusal:?}");
        // Still there.
        let kept = client
            .get_manifest(&repo, &refusal.item.name)
            .await
            .unwrap();
        assert_eq!(kept.digest, refusal.item.digest);
    }
}

fn blob(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs")
        .join(digest.algorithm().name())
        .join(digest.hex())
}

/// Writes `content` as a blob nothing refers to (what an interrupted write leaves).
fn orphan(dir: &Path, content: &str) -> Digest {
    let digest = Digest::sha256_of(content.as_bytes());
    std::fs::write(blob(dir, &digest), content).unwrap();
    digest
}

/// The digests an entry's manifest names, the manifest's own first.
fn entry_blobs(dir: &Path, manifest: &Digest) -> Vec<Digest> {
    let bytes = std::fs::read(blob(dir, manifest)).unwrap();
    let manifest_doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut digests = vec![manifest.clone()];
    let descriptors =
        std::iter::once(&manifest_doc["config"]).chain(manifest_doc["layers"].as_array().unwrap());
    for descriptor in descriptors {
        digests.push(Digest::parse(descriptor["digest"].as_str().unwrap()).unwrap());
    }
    digests
}

fn tagged_manifest(dir: &Path, tag: &str) -> Digest {
    let layout = kiln_oci::layout::OciLayout::open(dir).unwrap();
    layout.resolve(Some(tag)).unwrap().digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_prune_removes_old_entries_and_only_the_blobs_nothing_else_uses() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cache");
    let only_old = make_layer(work.path(), "old", "only an old entry has this\n");
    let shared = make_layer(work.path(), "shared", "old and young entries share this\n");
    let only_young = make_layer(work.path(), "young", "only a young entry has this\n");
    let young = CacheStore::oci_layout(&dir, DEFAULT_TTL).unwrap();
    let old = young.clone().with_clock(Arc::new(Behind(OLD)));

    let old_entries = vec![
        store(&old, 0, Some(&only_old)).await,
        store(&old, 1, Some(&shared)).await,
    ];
    record(&old, "old stage", old_entries.clone()).await;
    let young_entries = vec![
        store(&young, 2, Some(&shared)).await,
        store(&young, 3, Some(&only_young)).await,
    ];
    record(&young, "young stage", young_entries.clone()).await;
    let layout = kiln_oci::layout::OciLayout::open(&dir).unwrap();
    let (config, manifest) = foreign_image();
    layout.write_json_blob(&config).unwrap();
    let foreign = layout.write_json_blob(&manifest).unwrap();
    layout.tag("app-latest", foreign).unwrap();
    let old_orphan = orphan(&dir, "left by a write cut short long ago");
    make_old(&blob(&dir, &old_orphan), OLD);
    let young_orphan = orphan(&dir, "being written right now");

    // What must go: the old entries' and record's manifests and configs, the layer only an
    // old entry has, the old orphan. What must stay: everything a remaining tag refers to
    // (the shared layer included) and the young orphan.
    let mut gone: BTreeSet<Digest> = BTreeSet::new();
    for entry in &old_entries {
        gone.extend(entry_blobs(&dir, &entry.manifest_digest));
    }
    gone.extend(entry_blobs(
        &dir,
        &tagged_manifest(&dir, &locator("old stage").tag()),
    ));
    gone.insert(old_orphan.clone());
    let mut stay: BTreeSet<Digest> = BTreeSet::new();
    for entry in &young_entries {
        stay.extend(entry_blobs(&dir, &entry.manifest_digest));
    }
    for tag in [locator("young stage").tag(), "app-latest".to_owned()] {
        stay.extend(entry_blobs(&dir, &tagged_manifest(&dir, &tag)));
    }
    stay.insert(young_orphan.clone());
    assert!(stay.contains(&shared.descriptor.digest));
    gone.retain(|d| !stay.contains(d));
    assert!(gone.contains(&only_old.descriptor.digest));
    assert_eq!(gone.len(), 8, "3 manifests, 3 configs, 1 layer, 1 orphan");
    let gone_bytes: u64 = gone
        .iter()
        .map(|d| std::fs::metadata(blob(&dir, d)).unwrap().len())
        .sum();

    let mut expected = vec![
        (PrunedKind::StepEntry, key(0).tag()),
        (PrunedKind::StepEntry, key(1).tag()),
        (PrunedKind::StageRecord, locator("old stage").tag()),
    ];
    expected.sort();
    let check = |report: &PruneReport| {
        assert_eq!(removed(report), expected, "{report:?}");
        assert_eq!((report.kept, report.other), (3, 1), "{report:?}");
        assert!(
            report.failed.is_empty() && report.refused.is_empty(),
            "{report:?}"
        );
        assert_eq!(report.blobs_removed, gone.len(), "{report:?}");
        assert_eq!(report.bytes_freed, Some(gone_bytes), "{report:?}");
        assert_old_ages(report);
    };

    let index_before = std::fs::read(dir.join("index.json")).unwrap();
    let dry = young.prune(&prune_options(true)).await.unwrap();
    check(&dry);
    assert_eq!(std::fs::read(dir.join("index.json")).unwrap(), index_before);
    for digest in gone.iter().chain(&stay) {
        assert!(blob(&dir, digest).is_file(), "dry run removed {digest}");
    }

    let report = young.prune(&prune_options(false)).await.unwrap();
    check(&report);
    for digest in &gone {
        assert!(!blob(&dir, digest).exists(), "{digest} was left");
    }
    for digest in &stay {
        assert!(blob(&dir, digest).is_file(), "{digest} was removed");
    }
    // index.json is still a valid index with exactly the remaining tags.
    let index = kiln_oci::layout::OciLayout::open(&dir)
        .unwrap()
        .index()
        .unwrap();
    let mut tags: Vec<String> = index
        .manifests
        .iter()
        .map(|d| {
            d.annotation(kiln_oci::image::ANNOTATION_REF_NAME)
                .unwrap()
                .to_owned()
        })
        .collect();
    tags.sort();
    let mut expected_tags = vec![
        key(2).tag(),
        key(3).tag(),
        locator("young stage").tag(),
        "app-latest".to_owned(),
    ];
    expected_tags.sort();
    assert_eq!(tags, expected_tags);
    // Read back through the cache: the young entries hit, with their layers intact.
    let reader = CacheStore::oci_layout(&dir, DEFAULT_TTL).unwrap();
    for (entry, layer) in young_entries.iter().zip([&shared, &only_young]) {
        let hit = reader.lookup(&entry.key).await.unwrap().expect("young hit");
        let mut stream = reader
            .open_layer(hit.layer.as_ref().unwrap())
            .await
            .unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(bytes, std::fs::read(&layer.path).unwrap());
    }
    for entry in &old_entries {
        assert!(reader.lookup(&entry.key).await.unwrap().is_none());
    }
    let record = reader.lookup_stage(&locator("young stage")).await.unwrap();
    assert_eq!(record.expect("young record").entries, young_entries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_dir_prune_removes_an_old_image_but_not_the_layer_a_young_one_shares() {
    let registry = Registry::start();
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
    let path = work.path().join("cache-dir");
    let dir = BaseImageDir::open(&path).unwrap();
    let client = client();
    let reference = |name: &str| Reference::parse(&format!("{}/{name}", registry.addr())).unwrap();

    let old = dir
        .warm(&client, &reference("base/busybox:latest"), &platform())
        .await
        .unwrap();
    let old_image = dir.lookup(&old.digest, &platform()).unwrap().unwrap();
    let mut old_blobs = vec![
        old.digest.clone(),
        old_image.manifest_digest.clone(),
        old_image.manifest.config.digest.clone(),
    ];
    old_blobs.extend(old_image.layers.iter().map(|(d, _)| d.digest.clone()));
    for digest in &old_blobs {
        make_old(&blob(&path, digest), OLD);
    }
    // The young image shares the layer, which it finds in the directory, old as it is.
    let young = dir
        .warm(&client, &reference("base/noenv:latest"), &platform())
        .await
        .unwrap();
    let young_image = dir.lookup(&young.digest, &platform()).unwrap().unwrap();
    let shared = &young_image.layers[0].0.digest;
    assert_eq!(shared, &old_image.layers[0].0.digest);
    let old_orphan = orphan(&path, "a layer of a warm cut short long ago");
    make_old(&blob(&path, &old_orphan), OLD);
    let young_orphan = orphan(&path, "a layer being downloaded now");

    let gone: BTreeSet<Digest> = old_blobs
        .iter()
        .filter(|d| *d != shared)
        .cloned()
        .chain([old_orphan])
        .collect();
    let gone_bytes: u64 = gone
        .iter()
        .map(|d| std::fs::metadata(blob(&path, d)).unwrap().len())
        .sum();
    let check = |report: &PruneReport| {
        assert_eq!(
            removed(report),
            vec![(PrunedKind::BaseImage, old.digest.to_string())],
            "{report:?}"
        );
        assert_eq!(report.kept, 1, "{report:?}");
        assert!(report.failed.is_empty(), "{report:?}");
        assert_eq!(report.blobs_removed, gone.len(), "{report:?}");
        assert_eq!(report.bytes_freed, Some(gone_bytes), "{report:?}");
        assert_old_ages(report);
    };

    let dry = dir.prune(&prune_options(true)).await.unwrap();
    check(&dry);
    assert!(dir.lookup(&old.digest, &platform()).unwrap().is_some());

    let report = dir.prune(&prune_options(false)).await.unwrap();
    check(&report);
    for digest in &gone {
        assert!(!blob(&path, digest).exists(), "{digest} was left");
    }
    assert!(dir.lookup(&old.digest, &platform()).unwrap().is_none());
    let still = dir
        .lookup(&young.digest, &platform())
        .unwrap()
        .expect("young image");
    for (descriptor, file) in &still.layers {
        assert_eq!(
            Digest::sha256_of(&std::fs::read(file).unwrap()),
            descriptor.digest
        );
    }
    assert!(blob(&path, &young_orphan).is_file());
}

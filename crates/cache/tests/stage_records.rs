//! Stage records against real parts: written and read back through a loopback `docker-registry`
//! and an OCI layout, refused when stale or when they belong to another locator, and trusted
//! for a base config only when its digest is the one the base manifest names.

use std::sync::Arc;
use std::time::Duration;

use kiln_cache::{
    CacheEntry, CacheKey, CacheStore, Clock, KeyChain, LayerFile, NewEntry, Parent, RecordedBase,
    StageLocator, StageRecord, StepInput, DEFAULT_TTL,
};
use kiln_oci::{ContainerConfig, Digest, History, Platform};
use kiln_plan::ConfigEdit;
use kiln_registry::{Client, RegistryOptions, Repository};
use kiln_testkit::Registry;

mod support;
use support::{make_layer, Ahead};

fn client() -> Client {
    Client::new(RegistryOptions {
        retry_initial_delay: Duration::from_millis(20),
        ..RegistryOptions::default()
    })
    .unwrap()
}

fn keys(count: usize) -> Vec<CacheKey> {
    let platform = Platform::parse("linux/amd64").unwrap();
    let mut chain = KeyChain::new(Parent::Image(Digest::sha256_of(b"base")), platform);
    (0..count)
        .map(|i| chain.next_key(&StepInput::Config(ConfigEdit::WorkingDir(format!("/s{i}")))))
        .collect()
}

/// Writes one step entry per key, as the steps of a build would, and returns them.
async fn entries(store: &CacheStore, keys: &[CacheKey]) -> Vec<CacheEntry> {
    entries_with(store, keys, None).await
}

/// As [`entries`], the first entry with `layer`.
async fn entries_with(
    store: &CacheStore,
    keys: &[CacheKey],
    mut layer: Option<LayerFile>,
) -> Vec<CacheEntry> {
    let mut out = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let mut config = ContainerConfig::default();
        config.set_env_var("STEP", &i.to_string());
        let entry = NewEntry {
            key: key.clone(),
            platform: Platform::parse("linux/amd64").unwrap(),
            layer: layer.take(),
            config,
            history: History {
                created_by: Some(format!("WORKDIR /s{i}")),
                ..History::default()
            },
        };
        out.push(store.store(&entry).await.unwrap().entry);
    }
    out
}

fn base() -> RecordedBase {
    RecordedBase {
        manifest_digest: Digest::sha256_of(b"a base manifest"),
        config:
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_written_by_one_pod_answers_another_in_one_request() {
    let registry = Registry::start();
    let repo = format!("{}/team/app/cache", registry.addr());
    let first_pod = CacheStore::open(&repo, &client(), DEFAULT_TTL).unwrap();
    let keys = keys(3);
    let work = tempfile::tempdir().unwrap();
    let layer = make_layer(work.path(), "built", "by a cached step\n");
    let layer_digest = layer.descriptor.digest.clone();
    let written = entries_with(&first_pod, &keys, Some(layer)).await;
    let locator = StageLocator::new([b"Dockerfile text".as_slice(), b"0"]);
    let record = StageRecord {
        base: Some(base()),
        entries: written.clone(),
    };
    first_pod.store_stage(&locator, &record).await.unwrap();

    let second_pod = CacheStore::open(&repo, &client(), DEFAULT_TTL).unwrap();
    let found = second_pod
        .lookup_stage(&locator)
        .await
        .unwrap()
        .expect("the record is found");
    assert_eq!(found, record);
    for (key, entry) in keys.iter().zip(&written) {
        assert_eq!(found.entry(key, DEFAULT_TTL), Some(entry));
    }
    // A key the record does not hold is for the per-step lookup to answer.
    assert_eq!(found.entry(&self::keys(4)[3], DEFAULT_TTL), None);

    // The record's manifest carries it, so reading it needs no blob request.
    let manifest = client()
        .get_manifest(
            &Repository::new(registry.addr(), "team/app/cache").unwrap(),
            &locator.tag(),
        )
        .await
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap();
    assert!(manifest["config"]["data"].is_string(), "{manifest}");
    assert!(locator.tag().starts_with("stage-"));
    // It names the entries' layers, so garbage collection keeps them while it lives.
    assert_eq!(
        manifest["layers"][0]["digest"].as_str(),
        Some(layer_digest.to_string().as_str()),
        "{manifest}"
    );
    assert_eq!(
        found.entries[0].layer.as_ref().unwrap().descriptor.digest,
        layer_digest
    );

    // Another locator finds nothing.
    let other = StageLocator::new([b"Dockerfile text".as_slice(), b"1"]);
    assert_ne!(other, locator);
    assert!(second_pod.lookup_stage(&other).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_in_a_record_answer_nothing() {
    let registry = Registry::start();
    let repo = format!("{}/ttl/cache", registry.addr());
    let store = CacheStore::open(&repo, &client(), DEFAULT_TTL).unwrap();
    let keys = keys(2);
    let written = entries(&store, &keys).await;
    let locator = StageLocator::new([b"stale".as_slice()]);
    store
        .store_stage(
            &locator,
            &StageRecord {
                base: None,
                entries: written,
            },
        )
        .await
        .unwrap();
    // Ages are whole seconds: seen 3 s later everything is at least 3 s old, past a 2 s TTL.
    let later = Arc::new(Ahead(Duration::from_secs(3)));
    let short = CacheStore::open(&repo, &client(), Duration::from_secs(2))
        .unwrap()
        .with_clock(later.clone());
    assert!(short.lookup_stage(&locator).await.unwrap().is_none());
    let record = store.lookup_stage(&locator).await.unwrap().expect("fresh");
    assert!(record
        .entry_at(&keys[0], Duration::from_secs(2), later.now())
        .is_none());
    assert!(record.entry(&keys[0], DEFAULT_TTL).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_in_an_oci_layout_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let value = format!("oci:{}", dir.path().join("cache").display());
    let store = CacheStore::open(&value, &client(), DEFAULT_TTL).unwrap();
    let keys = keys(2);
    let written = entries(&store, &keys).await;
    let locator = StageLocator::new([b"layout".as_slice()]);
    let record = StageRecord {
        base: Some(base()),
        entries: written,
    };
    assert!(store.lookup_stage(&locator).await.unwrap().is_none());
    store.store_stage(&locator, &record).await.unwrap();
    let reopened = CacheStore::open(&value, &client(), DEFAULT_TTL).unwrap();
    assert_eq!(reopened.lookup_stage(&locator).await.unwrap(), Some(record));
    // Rewriting replaces it.
    let smaller = StageRecord::default();
    store.store_stage(&locator, &smaller).await.unwrap();
    assert_eq!(
        reopened.lookup_stage(&locator).await.unwrap(),
        Some(smaller)
    );
}

#[test]
fn a_record_gives_its_base_config_only_for_the_image_it_was_made_from() {
    let base = base();
    let record = StageRecord {
        base: Some(base.clone()),
        entries: Vec::new(),
    };
    let config_digest = Digest::sha256_of(&base.config);
    assert_eq!(
        record.base_config(&base.manifest_digest, &config_digest),
        Some(base.config.as_slice())
    );
    // The tag now names another manifest: the record's config is not used.
    let moved = Digest::sha256_of(b"a re-pushed base");
    assert_eq!(record.base_config(&moved, &config_digest), None);
    // Same manifest digest but the manifest names another config: refused too (the bytes are
    // checked, not just the digest the record claims).
    let other_config = Digest::sha256_of(b"another config");
    assert_eq!(
        record.base_config(&base.manifest_digest, &other_config),
        None
    );
    assert_eq!(
        StageRecord::default().base_config(&base.manifest_digest, &config_digest),
        None
    );
}

#[test]
fn locators_frame_their_parts() {
    // Moving bytes from one part to the next gives another locator.
    assert_ne!(
        StageLocator::new([b"ab".as_slice(), b"c"]),
        StageLocator::new([b"a".as_slice(), b"bc"])
    );
    assert_eq!(
        StageLocator::new([b"ab".as_slice(), b"c"]),
        StageLocator::new([b"ab".as_slice(), b"c"])
    );
}

//! distribution's `auth: token` mode with a token issuer run by the test: the Bearer
//! challenge, Basic to the realm, the OAuth2 refresh-token POST, `registrytoken`, and scopes
//! for cross-repository mounts.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kiln_registry::{Client, Clock, FileSource, PushBlobOptions, PushOutcome, Repository};
use kiln_testkit::{Registry, RegistryConfig};

use crate::support::*;

const USER: &str = "token-user";
const PASSWORD: &str = "t0ken-Pa55word-do-not-print";
const REFRESH: &str = "refresh-t0ken-do-not-print";

async fn start() -> (TokenServer, Registry) {
    let issuer = TokenServer::start(USER, PASSWORD, REFRESH).await;
    let registry = Registry::start_with(RegistryConfig {
        auth: Some(issuer.registry_auth_yaml()),
        ..RegistryConfig::default()
    });
    (issuer, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_for_push_pull_and_mount() {
    let (issuer, registry) = start().await;
    let addr = registry.addr();
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): basic_auth_entry(USER, PASSWORD) }
    }));
    let client = Client::new(test_options(keychain_for(secret.path()))).unwrap();
    let repo = Repository::new(&addr, "tokens/app").unwrap();
    let image = make_image("bearer", 150_000);

    assert_eq!(
        push_with_kiln(&client, &repo, &image, "v1").await,
        image.manifest_digest
    );
    // One scope (push,pull on the repository), one token, reused for every request.
    assert_eq!(
        issuer.requests.load(Ordering::SeqCst),
        1,
        "tokens are not cached"
    );

    let creds = format!("{USER}:{PASSWORD}");
    let pulled = skopeo_pull(
        &format!("{addr}/tokens/app:v1"),
        &[
            "--src-tls-verify=false".into(),
            "--src-creds".into(),
            creds.clone(),
        ],
    )
    .await;
    assert_eq!(pulled, image.manifest_digest);

    let other = make_image("bearer via skopeo", 40_000);
    let skopeo_digest = skopeo_push(
        &other,
        &format!("{addr}/tokens/from-skopeo:latest"),
        &[
            "--dest-tls-verify=false".into(),
            "--dest-creds".into(),
            creds,
        ],
    )
    .await;
    let into = tempfile::tempdir().unwrap();
    let from_skopeo = Repository::new(&addr, "tokens/from-skopeo").unwrap();
    assert_eq!(
        pull_with_kiln(&client, &from_skopeo, "latest", into.path()).await,
        skopeo_digest
    );

    // Mounting needs pull on the source as well as push on the target, in one token.
    let target = Repository::new(&addr, "tokens/derived").unwrap();
    let (layer, layer_path, _) = image.blobs[1].clone();
    let mounted = client
        .push_blob(
            &target,
            &FileSource::new(&layer_path).await.unwrap(),
            &PushBlobOptions {
                digest: Some(layer.clone()),
                mount_from: Some(repo.clone()),
            },
        )
        .await
        .unwrap();
    assert_eq!(mounted.outcome, PushOutcome::Mounted);
    assert!(client.blob_exists(&target, &layer).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_at_the_token_server_is_a_401_without_the_secret() {
    let (_issuer, registry) = start().await;
    let addr = registry.addr();
    let wrong = "not-the-Pa55word-secret";
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { format!("http://{addr}"): basic_auth_entry(USER, wrong) }
    }));
    let client = Client::new(test_options(keychain_for(secret.path()))).unwrap();
    let repo = Repository::new(&addr, "tokens/app").unwrap();
    let err = client.get_manifest(&repo, "v1").await.unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with(&format!("{addr}/tokens/app: ")), "{text}");
    assert!(text.contains("401 Unauthorized"), "{text}");
    assert!(
        !text.contains(wrong) && !format!("{err:?}").contains(wrong),
        "{err:?}"
    );

    // Anonymous access is refused by the issuer too, and says so.
    let anonymous = Client::new(test_options(kiln_registry::Keychain::anonymous())).unwrap();
    let err = anonymous.get_manifest(&repo, "v1").await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_token_and_registry_token() {
    let (issuer, registry) = start().await;
    let addr = registry.addr();
    let repo = Repository::new(&addr, "tokens/oauth").unwrap();
    let image = make_image("identity token", 10_000);

    // identitytoken: exchanged at the realm with an OAuth2 refresh-token POST.
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): { "username": "<token>", "identitytoken": REFRESH } }
    }));
    let client = Client::new(test_options(keychain_for(secret.path()))).unwrap();
    assert_eq!(
        push_with_kiln(&client, &repo, &image, "v1").await,
        image.manifest_digest
    );
    assert!(format!("{client:?}").find(REFRESH).is_none());

    // registrytoken: sent to the registry as the bearer token, no issuer round trip.
    let before = issuer.requests.load(Ordering::SeqCst);
    let minted = issuer.mint("tokens/oauth", "pull");
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): { "registrytoken": minted } }
    }));
    let client = Client::new(test_options(keychain_for(secret.path()))).unwrap();
    let into = tempfile::tempdir().unwrap();
    assert_eq!(
        pull_with_kiln(&client, &repo, "v1", into.path()).await,
        image.manifest_digest
    );
    assert_eq!(issuer.requests.load(Ordering::SeqCst), before);
    // The token only grants pull: a push is refused.
    let err = client
        .put_manifest(&repo, "v2", &image.media_type, image.manifest.clone())
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_cached_per_scope_until_they_expire() {
    // A 60 s token: `issued_at` has whole seconds and the client renews 10% (at most 10 s)
    // early, so the token is reused for at least 53 s of the client's clock, which the test
    // moves instead of waiting (the JWT itself stays valid for five minutes of real time).
    let issuer = TokenServer::start_with_lifetime(USER, PASSWORD, REFRESH, 60).await;
    let registry = Registry::start_with(RegistryConfig {
        auth: Some(issuer.registry_auth_yaml()),
        ..RegistryConfig::default()
    });
    let addr = registry.addr();
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): basic_auth_entry(USER, PASSWORD) }
    }));
    let clock = Arc::new(AheadClock::default());
    let client =
        Client::with_clock(test_options(keychain_for(secret.path())), clock.clone()).unwrap();
    let repo = Repository::new(&addr, "tokens/expiring").unwrap();
    let image = make_image("expiring", 1_000);
    push_with_kiln(&client, &repo, &image, "v1").await;
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 1);

    // A different scope (pull only) needs its own token; repeating it does not.
    client.get_manifest(&repo, "v1").await.unwrap();
    client.head_manifest(&repo, "v1").await.unwrap();
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 2);

    // Well within its lifetime the token is still reused...
    clock.advance(Duration::from_secs(30));
    client.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 2);

    // ...and after expires_in, the next request fetches a fresh one.
    clock.advance(Duration::from_secs(31));
    client.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 3);
}

/// The system's clocks moved forward by however much the test has advanced them.
#[derive(Debug, Default)]
struct AheadClock(Mutex<Duration>);

impl AheadClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for AheadClock {
    fn now(&self) -> Instant {
        Instant::now() + *self.0.lock().unwrap()
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::now() + *self.0.lock().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_pushes_share_one_token() {
    let (issuer, registry) = start().await;
    let addr = registry.addr();
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): basic_auth_entry(USER, PASSWORD) }
    }));
    let client = Client::new(test_options(keychain_for(secret.path()))).unwrap();
    let repo = Repository::new(&addr, "tokens/parallel").unwrap();
    let pushes = (0..4u8).map(|i| {
        let (client, repo) = (client.clone(), repo.clone());
        tokio::spawn(async move {
            let content = bytes::Bytes::from(vec![i; 10_000]);
            client
                .push_blob(
                    &repo,
                    &kiln_registry::BytesSource(content),
                    &PushBlobOptions::default(),
                )
                .await
        })
    });
    for push in futures::future::join_all(pushes).await {
        assert_eq!(push.unwrap().unwrap().outcome, PushOutcome::Uploaded);
    }
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_delete_asks_for_the_delete_action() {
    let (issuer, registry) = start().await;
    let addr = registry.addr();
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): basic_auth_entry(USER, PASSWORD) }
    }));
    let client = Client::new(test_options(keychain_for(secret.path()))).unwrap();
    let repo = Repository::new(&addr, "tokens/pruned").unwrap();
    let image = make_image("deleted with a token", 1_000);
    let digest = push_with_kiln(&client, &repo, &image, "v1").await;
    let before = issuer.requests.load(Ordering::SeqCst);
    // The registry checks the token for the `delete` action: a push,pull token is refused.
    assert!(client.delete_manifest(&repo, &digest).await.unwrap());
    assert_eq!(issuer.requests.load(Ordering::SeqCst), before + 1);
    let err = client.get_manifest(&repo, "v1").await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
}

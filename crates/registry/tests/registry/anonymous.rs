//! Anonymous plain-HTTP registry on 127.0.0.1: reached without any flag through the loopback
//! HTTP fallback.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use kiln_oci::{Digest, Reference};
use kiln_registry::{
    BytesSource, Client, Error, Keychain, PushBlobOptions, PushOutcome, ReaderSource,
    RegistryOptions, Repository, UploadMode,
};
use kiln_testkit::Registry;

use crate::support::*;

fn anonymous_client() -> Client {
    Client::new(test_options(Keychain::anonymous())).unwrap()
}

fn no_tls_verify() -> Vec<String> {
    vec!["--src-tls-verify=false".into()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_pulled_by_skopeo_and_skopeo_push_is_pulled_back() {
    let registry = Registry::start();
    let client = anonymous_client();
    let image = make_image("anonymous", 300_000);
    let repo = Repository::new(registry.addr(), "kiln/app").unwrap();

    let pushed = push_with_kiln(&client, &repo, &image, "v1").await;
    assert_eq!(pushed, image.manifest_digest);
    let pulled_by_skopeo = skopeo_pull(
        &format!("{}/kiln/app:v1", registry.addr()),
        &no_tls_verify(),
    )
    .await;
    assert_eq!(pulled_by_skopeo, image.manifest_digest);

    // The same through kiln-oci references: tag, tag+digest, and a wrong pinned digest.
    let by_tag = Reference::parse(&format!("{}/kiln/app:v1", registry.addr())).unwrap();
    let fetched = client.get_manifest_ref(&by_tag).await.unwrap();
    assert_eq!(fetched.digest, image.manifest_digest);
    assert_eq!(fetched.media_type, image.media_type);
    let pinned = by_tag
        .with_tag("v2")
        .unwrap()
        .with_digest(image.manifest_digest.clone());
    let put = client
        .put_manifest_ref(&pinned, &image.media_type, image.manifest.clone())
        .await
        .unwrap();
    assert_eq!(put, image.manifest_digest);
    let head = client.head_manifest_ref(&pinned).await.unwrap().unwrap();
    assert_eq!(head.digest, Some(image.manifest_digest.clone()));
    let wrong = by_tag.with_digest(Digest::sha256_of(b"another manifest"));
    let err = client
        .put_manifest_ref(&wrong, &image.media_type, image.manifest.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(client.get_manifest_ref(&wrong).await.is_err());

    let other = make_image("pushed by skopeo", 50_000);
    let dest = format!("{}/skopeo/app:latest", registry.addr());
    let skopeo_digest = skopeo_push(&other, &dest, &["--dest-tls-verify=false".into()]).await;
    let into = tempfile::tempdir().unwrap();
    let skopeo_repo = Repository::new(registry.addr(), "skopeo/app").unwrap();
    let kiln_digest = pull_with_kiln(&client, &skopeo_repo, "latest", into.path()).await;
    assert_eq!(kiln_digest, skopeo_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_from_a_stream_of_unknown_length() {
    let registry = Registry::start();
    let client = Client::new(RegistryOptions {
        upload_mode: UploadMode::Chunked,
        chunk_size: 64 * 1024,
        ..test_options(Keychain::anonymous())
    })
    .unwrap();
    let repo = Repository::new(registry.addr(), "chunks").unwrap();
    let image = make_image("chunked", 400_000);
    let (layer_digest, layer_path, layer_size) = image.blobs[1].clone();
    assert!(
        layer_size > 5 * 64 * 1024,
        "the layer must span several chunks"
    );

    // Neither size nor digest known: the digest is computed while the chunks go out.
    let file = tokio::fs::File::open(&layer_path).await.unwrap();
    let pushed = client
        .push_blob(
            &repo,
            &ReaderSource::new(file, None),
            &PushBlobOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(pushed.digest, layer_digest);
    assert_eq!(pushed.size, Some(layer_size));
    assert_eq!(pushed.outcome, PushOutcome::Uploaded);
    assert_eq!(
        client.blob_exists(&repo, &layer_digest).await.unwrap(),
        Some(layer_size)
    );

    // The registry serves exactly those bytes.
    let mut pulled = Vec::new();
    client
        .pull_blob_to(&repo, &layer_digest, &mut pulled)
        .await
        .unwrap();
    assert_eq!(pulled, std::fs::read(&layer_path).unwrap());

    // A declared digest that the content doesn't have stops the upload before it commits.
    let wrong = Digest::sha256_of(b"something else");
    let err = client
        .push_blob(
            &repo,
            &BytesSource(Bytes::from_static(b"actual content of this blob")),
            &PushBlobOptions {
                digest: Some(wrong.clone()),
                mount_from: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&registry.addr()), "{err}");
    assert_eq!(client.blob_exists(&repo, &wrong).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monolithic_upload_refuses_content_that_does_not_match() {
    let registry = Registry::start();
    let client = anonymous_client();
    let repo = Repository::new(registry.addr(), "mono").unwrap();
    let content = Bytes::from_static(b"the real content");
    let wrong = Digest::sha256_of(b"the claimed content");
    let err = client
        .push_blob(
            &repo,
            &BytesSource(content.clone()),
            &PushBlobOptions {
                digest: Some(wrong.clone()),
                mount_from: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert_eq!(client.blob_exists(&repo, &wrong).await.unwrap(), None);

    let right = Digest::sha256_of(&content);
    let pushed = client
        .push_blob(
            &repo,
            &BytesSource(content),
            &PushBlobOptions {
                digest: Some(right.clone()),
                mount_from: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(pushed.outcome, PushOutcome::Uploaded);
    assert_eq!(client.blob_exists(&repo, &right).await.unwrap(), Some(16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_repository_mount_head_and_existing_blobs() {
    let registry = Registry::start();
    let client = anonymous_client();
    let source = Repository::new(registry.addr(), "base/image").unwrap();
    let target = Repository::new(registry.addr(), "team/derived").unwrap();
    let image = make_image("mount", 20_000);
    push_with_kiln(&client, &source, &image, "latest").await;
    let (layer, layer_path, layer_size) = image.blobs[1].clone();
    let (config, _, config_size) = image.blobs[0].clone();

    assert_eq!(client.blob_exists(&target, &layer).await.unwrap(), None);
    let mounted = client
        .push_blob(
            &target,
            &kiln_registry::FileSource::new(&layer_path).await.unwrap(),
            &PushBlobOptions {
                digest: Some(layer.clone()),
                mount_from: Some(source.clone()),
            },
        )
        .await
        .unwrap();
    assert_eq!(mounted.outcome, PushOutcome::Mounted);
    assert_eq!(
        client.blob_exists(&target, &layer).await.unwrap(),
        Some(layer_size)
    );

    assert!(client.mount_blob(&target, &config, &source).await.unwrap());
    assert_eq!(
        client.blob_exists(&target, &config).await.unwrap(),
        Some(config_size)
    );
    let absent = Digest::sha256_of(b"never pushed");
    assert!(!client.mount_blob(&target, &absent, &source).await.unwrap());

    let again = client
        .push_blob(
            &target,
            &kiln_registry::FileSource::new(&layer_path).await.unwrap(),
            &PushBlobOptions {
                digest: Some(layer.clone()),
                mount_from: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(again.outcome, PushOutcome::AlreadyPresent);

    let head = client
        .head_manifest(&source, "latest")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.digest, Some(image.manifest_digest.clone()));
    assert_eq!(head.size, Some(image.manifest.len() as u64));
    assert_eq!(head.media_type, Some(image.media_type.clone()));
    assert_eq!(
        client.head_manifest(&source, "missing").await.unwrap(),
        None
    );
    let by_digest = client
        .head_manifest(&source, &image.manifest_digest.to_string())
        .await
        .unwrap();
    assert!(by_digest.is_some());

    let err = client.get_manifest(&source, "missing").await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("{}/base/image", registry.addr())),
        "{text}"
    );
    assert!(
        text.contains("404") && text.contains("MANIFEST_UNKNOWN"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_follows_pagination() {
    let registry = Registry::start();
    let client = Client::new(RegistryOptions {
        tags_page_size: Some(2),
        ..test_options(Keychain::anonymous())
    })
    .unwrap();
    let repo = Repository::new(registry.addr(), "tagged").unwrap();
    let image = make_image("tags", 1_000);
    let mut expected = Vec::new();
    for tag in ["a", "b", "c", "d", "e"] {
        push_with_kiln(&client, &repo, &image, tag).await;
        expected.push(tag.to_owned());
    }
    let mut tags = client.list_tags(&repo).await.unwrap();
    tags.sort();
    assert_eq!(tags, expected);

    let listed = skopeo(&[
        "list-tags".into(),
        "--tls-verify=false".into(),
        format!("docker://{}/tagged", registry.addr()),
    ])
    .await;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let mut skopeo_tags: Vec<String> = serde_json::from_value(listed["Tags"].clone()).unwrap();
    skopeo_tags.sort();
    assert_eq!(skopeo_tags, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_503_and_honours_retry_after() {
    let registry = Registry::start();
    let fault = |prefix: &'static str, retry_after: &str| Fault {
        matches: Box::new(move |line: &str| line.starts_with(prefix)),
        response: empty_response("503 Service Unavailable", retry_after),
        remaining: 1,
    };
    let proxy = FaultProxy::start(
        registry.socket_addr(),
        vec![
            fault("PATCH ", "Retry-After: 1\r\n"),
            fault("PUT /v2/flaky/blobs/", ""),
            fault("GET /v2/flaky/blobs/", ""),
            fault("PUT /v2/flaky/manifests/", ""),
        ],
    )
    .await;
    let proxied = proxy.addr.to_string();
    let repo = Repository::new(&proxied, "flaky").unwrap();
    let image = make_image("flaky", 100_000);

    // Monolithic uploads (digest and size known) are restarted from a fresh session;
    // the manifest PUT is re-sent as is.
    let client = anonymous_client();
    assert_eq!(
        push_with_kiln(&client, &repo, &image, "v1").await,
        image.manifest_digest
    );

    // A chunk is re-sent after the Retry-After delay.
    let chunked = Client::new(RegistryOptions {
        upload_mode: UploadMode::Chunked,
        chunk_size: 32 * 1024,
        ..test_options(Keychain::anonymous())
    })
    .unwrap();
    let started = Instant::now();
    let blob = Bytes::from(vec![7u8; 100_000]);
    let pushed = chunked
        .push_blob(
            &repo,
            &BytesSource(blob.clone()),
            &PushBlobOptions::default(),
        )
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(pushed.digest, Digest::sha256_of(&blob));

    // A blob GET is retried.
    let into = tempfile::tempdir().unwrap();
    assert_eq!(
        pull_with_kiln(&client, &repo, "v1", into.path()).await,
        image.manifest_digest
    );
    assert_eq!(proxy.faults_served.load(Ordering::SeqCst), 4);

    // Out of retries, the 503 is reported with the registry and repository.
    let no_retries = Client::new(RegistryOptions {
        retries: 0,
        ..test_options(Keychain::anonymous())
    })
    .unwrap();
    let always = FaultProxy::start(
        registry.socket_addr(),
        vec![Fault {
            matches: Box::new(|line: &str| line.starts_with("GET /v2/flaky/manifests/")),
            response: empty_response("503 Service Unavailable", ""),
            remaining: usize::MAX,
        }],
    )
    .await;
    let repo = Repository::new(always.addr.to_string(), "flaky").unwrap();
    let err = no_retries.get_manifest(&repo, "v1").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}/flaky: manifest pull refused: 503 Service Unavailable",
            always.addr
        )
    );
    assert!(err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blob_is_an_error() {
    let registry = Registry::start();
    let client = anonymous_client();
    let repo = Repository::new(registry.addr(), "corrupt").unwrap();
    let image = make_image("corrupt", 10_000);
    push_with_kiln(&client, &repo, &image, "v1").await;
    let (layer, _, _) = image.blobs[1].clone();

    let body = "these are not the bytes you are looking for";
    let proxy = FaultProxy::start(
        registry.socket_addr(),
        vec![Fault {
            matches: Box::new(|line: &str| line.starts_with("GET /v2/corrupt/blobs/")),
            response: format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
            remaining: usize::MAX,
        }],
    )
    .await;
    let repo = Repository::new(proxy.addr.to_string(), "corrupt").unwrap();
    let mut stream = client.get_blob(&repo, &layer).await.unwrap();
    let mut received = 0;
    let mut failure = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => received += chunk.len(),
            Err(e) => failure = Some(e),
        }
    }
    assert_eq!(received, body.len());
    let failure = failure.expect("a mismatching blob must end in an error");
    assert!(matches!(failure, Error::DigestMismatch { .. }), "{failure}");
    assert!(
        failure.to_string().contains(&layer.to_string()),
        "{failure}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_name_falls_back_to_plain_http() {
    let registry = Registry::start();
    let client = anonymous_client();
    let localhost = format!("localhost:{}", registry.socket_addr().port());
    client.ping(&localhost).await.unwrap();
    let repo = Repository::new(&localhost, "via-localhost").unwrap();
    let image = make_image("localhost", 1_000);
    assert_eq!(
        push_with_kiln(&client, &repo, &image, "v1").await,
        image.manifest_digest
    );
    let pulled = client.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(pulled.digest, image.manifest_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_map_tries_mirrors_then_the_original() {
    let original = Registry::start();
    let mirror = Registry::start();
    let client = anonymous_client();
    let image = make_image("mirrored", 5_000);
    let repo = Repository::new(original.addr(), "lib/app").unwrap();
    push_with_kiln(&client, &repo, &image, "v1").await;

    // The mirror lacks the image: the pull falls back to the original.
    let proxy = FaultProxy::start(mirror.socket_addr(), Vec::new()).await;
    let mut options = test_options(Keychain::anonymous());
    options
        .add_registry_map(&format!("{}={}/cache", original.addr(), proxy.addr))
        .unwrap();
    let mirrored = Client::new(options.clone()).unwrap();
    let into = tempfile::tempdir().unwrap();
    assert_eq!(
        pull_with_kiln(&mirrored, &repo, "v1", into.path()).await,
        image.manifest_digest
    );
    assert!(proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.starts_with("GET /v2/cache/lib/app/manifests/v1")));

    // Once the mirror has it (under its path prefix), it serves the pull alone.
    let mirror_repo = Repository::new(mirror.addr(), "cache/lib/app").unwrap();
    push_with_kiln(&client, &mirror_repo, &image, "v1").await;
    options.skip_default_registry_fallback = true;
    let mirror_only = Client::new(options).unwrap();
    let dead_original = Repository::new("127.0.0.1:9", "lib/app").unwrap();
    let mut options = test_options(Keychain::anonymous());
    options
        .add_registry_map(&format!("127.0.0.1:9={}/cache", proxy.addr))
        .unwrap();
    options.skip_default_registry_fallback = true;
    let via_mirror = Client::new(options).unwrap();
    let into = tempfile::tempdir().unwrap();
    assert_eq!(
        pull_with_kiln(&via_mirror, &dead_original, "v1", into.path()).await,
        image.manifest_digest
    );
    assert_eq!(
        pull_with_kiln(&mirror_only, &repo, "v1", into.path()).await,
        image.manifest_digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_download_resumes_with_a_range_request() {
    let registry = Registry::start();
    let client = anonymous_client();
    let repo = Repository::new(registry.addr(), "resume").unwrap();
    let image = make_image("resume", 1_000);
    push_with_kiln(&client, &repo, &image, "v1").await;
    // The config is JSON, so its first bytes fit in the proxy's text response.
    let (config, config_path, config_size) = image.blobs[0].clone();
    let content = std::fs::read_to_string(&config_path).unwrap();
    let cut = 100;
    let proxy = FaultProxy::start(
        registry.socket_addr(),
        vec![Fault {
            matches: Box::new(|line: &str| line.starts_with("GET /v2/resume/blobs/")),
            response: format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {config_size}\r\nConnection: close\r\n\r\n{}",
                &content[..cut]
            ),
            remaining: 1,
        }],
    )
    .await;
    let repo = Repository::new(proxy.addr.to_string(), "resume").unwrap();
    let mut pulled = Vec::new();
    let size = client
        .pull_blob_to(&repo, &config, &mut pulled)
        .await
        .unwrap();
    assert_eq!(size, config_size);
    assert_eq!(pulled, content.as_bytes());
    assert_eq!(proxy.faults_served.load(Ordering::SeqCst), 1);
    let blob_gets = proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with("GET /v2/resume/blobs/"))
        .count();
    assert_eq!(blob_gets, 2, "one cut-off answer, one resumed range");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried_and_one_shot_bodies_are_not_resent() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(
        registry.socket_addr(),
        vec![
            // Hang up without an answer: a connection error.
            Fault {
                matches: Box::new(|line: &str| line.starts_with("GET /v2/dropped/manifests/")),
                response: String::new(),
                remaining: 1,
            },
            Fault {
                matches: Box::new(|line: &str| line.starts_with("PUT /v2/dropped/blobs/uploads/")),
                response: empty_response("503 Service Unavailable", ""),
                remaining: 1,
            },
        ],
    )
    .await;
    let client = anonymous_client();
    let direct = Repository::new(registry.addr(), "dropped").unwrap();
    let image = make_image("dropped", 1_000);
    push_with_kiln(&client, &direct, &image, "v1").await;

    let repo = Repository::new(proxy.addr.to_string(), "dropped").unwrap();
    let manifest = client.get_manifest(&repo, "v1").await.unwrap();
    assert_eq!(manifest.digest, image.manifest_digest);

    // A one-shot reader with known digest and size goes up in one PUT; when that PUT fails
    // the upload cannot be restarted, and the registry's answer is the error.
    let content = Bytes::from_static(b"streamed once, never again");
    let digest = Digest::sha256_of(&content);
    let reader = ReaderSource::new(
        std::io::Cursor::new(content.clone()),
        Some(content.len() as u64),
    );
    let err = client
        .push_blob(
            &repo,
            &reader,
            &PushBlobOptions {
                digest: Some(digest.clone()),
                mount_from: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(503), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("{}/dropped: push refused", proxy.addr)),
        "{err}"
    );
    assert_eq!(client.blob_exists(&repo, &digest).await.unwrap(), None);
    assert_eq!(proxy.faults_served.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_are_limited() {
    let registry = Registry::start();
    let client = Client::new(RegistryOptions {
        max_concurrent_transfers: 1,
        ..test_options(Keychain::anonymous())
    })
    .unwrap();
    let repo = Repository::new(registry.addr(), "limited").unwrap();
    let image = make_image("limited", 1_000);
    push_with_kiln(&client, &repo, &image, "v1").await;
    let (config, _, _) = image.blobs[0].clone();

    let first = client.get_blob(&repo, &config).await.unwrap();
    let waiting =
        tokio::time::timeout(Duration::from_millis(300), client.get_blob(&repo, &config)).await;
    assert!(
        waiting.is_err(),
        "a second transfer started while the first was open"
    );
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(10), client.get_blob(&repo, &config))
        .await
        .expect("the second transfer starts once the first is dropped")
        .unwrap();
    let received: Vec<Bytes> = second.map(|c| c.unwrap()).collect().await;
    assert_eq!(received.concat(), std::fs::read(&image.blobs[0].1).unwrap());
}

#[test]
fn client_certificates_and_cas_are_checked_when_the_client_is_made() {
    let tls = make_tls();
    let mut options = RegistryOptions::default();
    options
        .add_registry_client_certificate(&format!(
            "reg.example:5000={},{}",
            tls.cert.display(),
            tls.key.display()
        ))
        .unwrap();
    options
        .add_registry_certificate(&format!("reg.example:5000={}", tls.ca.display()))
        .unwrap();
    Client::new(options).unwrap();

    let mut missing = RegistryOptions::default();
    missing
        .add_registry_certificate("reg.example:5000=/nonexistent/ca.pem")
        .unwrap();
    let err = Client::new(missing).unwrap_err().to_string();
    assert!(
        err.contains("reg.example:5000") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );

    let mut mismatched = RegistryOptions::default();
    mismatched
        .add_registry_client_certificate(&format!(
            "reg.example:5000={},{}",
            tls.cert.display(),
            tls.ca.display()
        ))
        .unwrap();
    let err = Client::new(mismatched).unwrap_err().to_string();
    assert!(err.contains("reg.example:5000"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_waiting_on_a_failing_ping_share_its_failure() {
    // Accepts every connection and hangs up at once: no request gets an answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((connection, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(connection);
        }
    });
    let client = anonymous_client();

    let waves = futures::future::join_all((0..4).map(|_| client.ping(&registry))).await;
    for result in &waves {
        assert!(matches!(result, Err(Error::Transport { .. })), "{result:?}");
    }
    let shared = accepted.load(Ordering::SeqCst);
    assert!(shared > 0);
    // A caller that comes after the failure tries again, with the same budget.
    assert!(client.ping(&registry).await.is_err());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2 * shared,
        "four waiting callers made as many connections as one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_delete_by_digest_and_a_registry_that_refuses_it() {
    let registry = Registry::start();
    let client = anonymous_client();
    let repo = Repository::new(registry.addr(), "deleting/app").unwrap();
    let image = make_image("delete", 1_000);
    let digest = push_with_kiln(&client, &repo, &image, "v1").await;
    assert!(client.delete_manifest(&repo, &digest).await.unwrap());
    // Gone by digest and by the tag that pointed to it.
    for reference in [digest.to_string(), "v1".to_owned()] {
        let err = client.get_manifest(&repo, &reference).await.unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(404), "{err}");
    }
    // Deleting what is not there is no error: the caller wanted it gone.
    assert!(!client.delete_manifest(&repo, &digest).await.unwrap());

    // distribution's default configuration: deletes off, answered 405 UNSUPPORTED.
    let refusing = Registry::start_with(kiln_testkit::RegistryConfig {
        deletes_disabled: true,
        ..kiln_testkit::RegistryConfig::default()
    });
    let repo = Repository::new(refusing.addr(), "deleting/app").unwrap();
    let digest = push_with_kiln(&client, &repo, &image, "v1").await;
    let err = client.delete_manifest(&repo, &digest).await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(405), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "{}/deleting/app: manifest delete refused: 405",
            refusing.addr()
        )),
        "{text}"
    );
    assert!(text.contains("UNSUPPORTED"), "{text}");
    assert_eq!(
        client.get_manifest(&repo, "v1").await.unwrap().digest,
        digest
    );
}

//! TLS as users deploy registries: certificates made by the `openssl` command (Docker's
//! documented self-signed recipe, which OpenSSL 3 marks `CA:TRUE`; leaves of a private CA;
//! a DNS-only certificate reached by IP; expired ones; a registry demanding client
//! certificates through `http.tls.clientcas`), trusted by flag, by a certs.d directory, and by
//! certs.d directories mounted as a kubelet mounts a Secret. Refusals must say what to do, and
//! no private key may show in any message.

use std::path::Path;

use kiln_registry::{Client, Error, Keychain, RegistryOptions, Repository};
use kiln_testkit::certs::{kubelet_secret_mount, CertKey, Certs};
use kiln_testkit::{Registry, RegistryConfig};

use crate::support::*;

/// How a test tells Kiln to trust a registry's certificate (and present a client's).
#[derive(Clone, Copy, Debug)]
enum Trust {
    /// `--registry-certificate REGISTRY=FILE` (and `--registry-client-cert`).
    Flag,
    /// `--registry-certs-dir ROOT`, plain files in `ROOT/HOST:PORT/`, as in /etc/docker/certs.d.
    CertsD,
    /// `--registry-certs-dir ROOT`, ROOT a Secret mounted with `items` paths
    /// `HOST:PORT/ca.crt`: `ROOT/HOST:PORT -> ..data/HOST:PORT`.
    SecretCertsD,
    /// `--registry-certs-dir REGISTRY=DIR`, DIR a Secret with keys `ca.crt`, `client.cert`,
    /// `client.key`: `DIR/ca.crt -> ..data/ca.crt`.
    SecretDir,
}

const EVERY_WAY: [Trust; 4] = [
    Trust::Flag,
    Trust::CertsD,
    Trust::SecretCertsD,
    Trust::SecretDir,
];

/// Options that trust `trusted` (a CA, or the server's own certificate) for `registry` as
/// `how` says, presenting `client` if given. The directory holds what the options point to.
fn trusting(
    how: Trust,
    registry: &str,
    trusted: &Path,
    client: Option<&CertKey>,
) -> (RegistryOptions, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = test_options(Keychain::anonymous());
    // Only what the test configures: not whatever this machine has in /etc/docker/certs.d.
    options.system_certs_dirs = false;
    let mut files: Vec<(String, &Path)> = vec![("ca.crt".into(), trusted)];
    if let Some(client) = client {
        files.push(("client.cert".into(), &client.cert));
        files.push(("client.key".into(), &client.key));
    }
    match how {
        Trust::Flag => {
            options
                .add_registry_certificate(&format!("{registry}={}", trusted.display()))
                .unwrap();
            if let Some(client) = client {
                options
                    .add_registry_client_certificate(&format!(
                        "{registry}={},{}",
                        client.cert.display(),
                        client.key.display()
                    ))
                    .unwrap();
            }
        }
        Trust::CertsD => {
            let host = dir.path().join(registry);
            std::fs::create_dir(&host).unwrap();
            for (name, source) in &files {
                std::fs::copy(source, host.join(name)).unwrap();
            }
            options
                .add_registry_certs_dir(&dir.path().display().to_string())
                .unwrap();
        }
        Trust::SecretCertsD => {
            let items: Vec<(String, &Path)> = files
                .iter()
                .map(|(name, source)| (format!("{registry}/{name}"), *source))
                .collect();
            let items: Vec<(&str, &Path)> = items.iter().map(|(n, s)| (n.as_str(), *s)).collect();
            kubelet_secret_mount(dir.path(), &items);
            assert!(dir.path().join(registry).is_symlink());
            options
                .add_registry_certs_dir(&dir.path().display().to_string())
                .unwrap();
        }
        Trust::SecretDir => {
            let items: Vec<(&str, &Path)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
            kubelet_secret_mount(dir.path(), &items);
            assert!(dir.path().join("ca.crt").is_symlink());
            options
                .add_registry_certs_dir(&format!("{registry}={}", dir.path().display()))
                .unwrap();
        }
    }
    (options, dir)
}

fn tls_registry(server: &CertKey, client_cas: &[&Path]) -> Registry {
    Registry::start_with(RegistryConfig {
        tls: Some((server.cert.clone(), server.key.clone())),
        client_cas: client_cas.iter().map(|p| p.to_path_buf()).collect(),
        ..RegistryConfig::default()
    })
}

/// Push, pull, and what the layer cache does (existence checks, a cross-repository mount, a
/// manifest tagged by key, the tag list), all of which must work over the trusted TLS.
async fn push_pull_and_cache(client: &Client, addr: &str, label: &str) {
    let repo = Repository::new(addr, format!("{label}/app")).unwrap();
    let image = make_image(label, 40_000);
    assert_eq!(
        push_with_kiln(client, &repo, &image, "v1").await,
        image.manifest_digest,
        "{label}"
    );
    let into = tempfile::tempdir().unwrap();
    assert_eq!(
        pull_with_kiln(client, &repo, "v1", into.path()).await,
        image.manifest_digest,
        "{label}"
    );
    let cache = Repository::new(addr, format!("{label}/cache")).unwrap();
    for (digest, _, size) in &image.blobs {
        assert_eq!(
            client.blob_exists(&repo, digest).await.unwrap(),
            Some(*size)
        );
        assert!(client.mount_blob(&cache, digest, &repo).await.unwrap());
        assert_eq!(
            client.blob_exists(&cache, digest).await.unwrap(),
            Some(*size)
        );
    }
    let key_tag = "0123456789abcdef";
    client
        .put_manifest(&cache, key_tag, &image.media_type, image.manifest.clone())
        .await
        .unwrap();
    assert_eq!(
        client.get_manifest(&cache, key_tag).await.unwrap().digest,
        image.manifest_digest
    );
    assert_eq!(
        client.list_tags(&cache).await.unwrap(),
        vec![key_tag.to_owned()]
    );
}

/// A pull and a push that must both be refused for the certificate; returns the pull's
/// message after checking that both name the registry.
async fn refused(client: &Client, addr: &str) -> String {
    let repo = Repository::new(addr, "refused/app").unwrap();
    let pull = client.get_manifest(&repo, "v1").await.unwrap_err();
    let image = make_image("refused", 1_000);
    let (digest, path, _) = image.blobs[0].clone();
    let push = client
        .push_blob(
            &repo,
            &kiln_registry::FileSource::new(&path).await.unwrap(),
            &kiln_registry::PushBlobOptions {
                digest: Some(digest),
                mount_from: None,
            },
        )
        .await
        .unwrap_err();
    for err in [&pull, &push] {
        assert!(matches!(err, Error::Certificate { .. }), "{err:?}");
        assert!(err.to_string().starts_with(addr), "{err}");
        assert!(!err.is_retryable(), "{err}");
    }
    pull.to_string()
}

fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl3_self_signed_certificate_is_trusted_as_itself() {
    let certs = Certs::new();
    let server = certs.self_signed("registry", "127.0.0.1", Some("IP:127.0.0.1"));
    // The premise of the test: OpenSSL 3 marks Docker's recipe as a CA.
    assert_contains(&server.text(), &["CA:TRUE"]);
    let registry = tls_registry(&server, &[]);
    let addr = registry.addr();

    let untrusting = test_options(Keychain::anonymous());
    let text = refused(&Client::new(untrusting).unwrap(), &addr).await;
    assert_contains(
        &text,
        &[
            "TLS certificate not trusted",
            "a certificate for IP:127.0.0.1",
            "subject \"CN=127.0.0.1\"",
            "issued by itself (self-signed)",
            &format!("SHA-256 fingerprint {}", server.fingerprint()),
            "CA:TRUE",
            &format!("--registry-certificate {addr}=FILE"),
            &format!("save it as a *.crt file in /etc/docker/certs.d/{addr}/"),
        ],
    );

    for how in EVERY_WAY {
        let (options, _dir) = trusting(how, &addr, &server.cert, None);
        let client = Client::new(options).unwrap();
        push_pull_and_cache(
            &client,
            &addr,
            &format!("self-signed-{how:?}").to_lowercase(),
        )
        .await;
    }

    // skopeo, the reference client, trusts the same certificate the same way.
    let cert_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&server.cert, cert_dir.path().join("ca.crt")).unwrap();
    let (options, _dir) = trusting(Trust::Flag, &addr, &server.cert, None);
    let client = Client::new(options).unwrap();
    let image = make_image("skopeo reads it back", 10_000);
    let repo = Repository::new(&addr, "cross/app").unwrap();
    push_with_kiln(&client, &repo, &image, "v1").await;
    let pulled = skopeo_pull(
        &format!("{addr}/cross/app:v1"),
        &[
            "--src-cert-dir".into(),
            cert_dir.path().display().to_string(),
        ],
    )
    .await;
    assert_eq!(pulled, image.manifest_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_of_a_private_ca_is_trusted_through_its_ca() {
    let certs = Certs::new();
    let ca = certs.ca("ca", "Kiln Test CA");
    let server = certs.leaf(
        "registry",
        &ca,
        "registry",
        Some("IP:127.0.0.1,DNS:localhost"),
        "serverAuth",
    );
    assert_contains(&server.text(), &["CA:FALSE"]);
    let registry = tls_registry(&server, &[]);
    let addr = registry.addr();

    let untrusting = test_options(Keychain::anonymous());
    let text = refused(&Client::new(untrusting).unwrap(), &addr).await;
    assert_contains(
        &text,
        &[
            "TLS certificate not trusted",
            "a certificate for IP:127.0.0.1, DNS:localhost",
            "whose issuer is not a trusted CA",
            "subject \"CN=registry\"",
            "issued by \"CN=Kiln Test CA\"",
            &server.fingerprint(),
            "give Kiln the certificate of the CA \"CN=Kiln Test CA\"",
        ],
    );

    for how in EVERY_WAY {
        let (options, _dir) = trusting(how, &addr, &ca.cert, None);
        let client = Client::new(options).unwrap();
        push_pull_and_cache(
            &client,
            &addr,
            &format!("private-ca-{how:?}").to_lowercase(),
        )
        .await;
    }
    // By name too: the certificate has DNS:localhost.
    let localhost = format!("localhost:{}", registry.socket_addr().port());
    let (options, _dir) = trusting(Trust::SecretCertsD, &localhost, &ca.cert, None);
    push_pull_and_cache(&Client::new(options).unwrap(), &localhost, "by-name").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_only_certificate_reached_by_ip_lists_its_names() {
    let certs = Certs::new();
    let ca = certs.ca("ca", "Kiln Test CA");
    let leaf = certs.leaf(
        "leaf",
        &ca,
        "registry.test",
        Some("DNS:registry.test"),
        "serverAuth",
    );
    let own = certs.self_signed("own", "registry.test", Some("DNS:registry.test"));
    // Trusted through its CA (webpki's check) and as itself (Go's).
    for (server, trusted) in [(&leaf, &ca.cert), (&own, &own.cert)] {
        let registry = tls_registry(server, &[]);
        let addr = registry.addr();
        for how in EVERY_WAY {
            let (options, _dir) = trusting(how, &addr, trusted, None);
            let text = refused(&Client::new(options).unwrap(), &addr).await;
            assert_contains(
                &text,
                &[
                    "TLS certificate not valid for 127.0.0.1",
                    "whose names are DNS:registry.test.",
                    "subjectAltName includes IP:127.0.0.1",
                    &server.fingerprint(),
                ],
            );
        }
    }

    // No subjectAltName at all: the common name is not a name, as in Go since 1.15.
    let cn_only = certs.self_signed("cn-only", "127.0.0.1", None);
    let registry = tls_registry(&cn_only, &[]);
    let addr = registry.addr();
    let (options, _dir) = trusting(Trust::Flag, &addr, &cn_only.cert, None);
    let text = refused(&Client::new(options).unwrap(), &addr).await;
    assert_contains(
        &text,
        &[
            "has no subjectAltName extension",
            "common name \"127.0.0.1\" is not used",
            "-addext subjectAltName=IP:127.0.0.1",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_says_when_it_expired() {
    let certs = Certs::new();
    let ca = certs.ca("ca", "Kiln Test CA");
    let (start, end) = ("20200101000000Z", "20210101000000Z");
    let leaf = certs.dated("leaf", Some(&ca), "127.0.0.1", "IP:127.0.0.1", start, end);
    let own = certs.dated("own", None, "127.0.0.1", "IP:127.0.0.1", start, end);
    assert_contains(&own.text(), &["CA:TRUE", "Jan  1 00:00:00 2021 GMT"]);
    for (server, trusted) in [(&leaf, &ca.cert), (&own, &own.cert)] {
        let registry = tls_registry(server, &[]);
        let addr = registry.addr();
        for how in EVERY_WAY {
            let (options, _dir) = trusting(how, &addr, trusted, None);
            let text = refused(&Client::new(options).unwrap(), &addr).await;
            assert_contains(
                &text,
                &[
                    "TLS certificate expired on 2021-01-01 00:00:00 UTC",
                    "valid from 2020-01-01 00:00:00 UTC to 2021-01-01 00:00:00 UTC",
                    "needs a new certificate",
                    &server.fingerprint(),
                ],
            );
        }
    }

    // Not valid yet is told apart from expired.
    let future = certs.dated(
        "future",
        None,
        "127.0.0.1",
        "IP:127.0.0.1",
        "20990101000000Z",
        "21000101000000Z",
    );
    let registry = tls_registry(&future, &[]);
    let addr = registry.addr();
    let (options, _dir) = trusting(Trust::SecretDir, &addr, &future.cert, None);
    let text = refused(&Client::new(options).unwrap(), &addr).await;
    assert_contains(
        &text,
        &["TLS certificate not valid before 2099-01-01 00:00:00 UTC"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_registry_through_certs_d() {
    let certs = Certs::new();
    let ca = certs.ca("ca", "Kiln Test CA");
    let server = certs.leaf(
        "registry",
        &ca,
        "registry",
        Some("IP:127.0.0.1"),
        "serverAuth",
    );
    let client_cert = certs.leaf("client", &ca, "kiln builder", None, "clientAuth");
    let registry = tls_registry(&server, &[&ca.cert]);
    let addr = registry.addr();

    for how in EVERY_WAY {
        let (options, _dir) = trusting(how, &addr, &ca.cert, Some(&client_cert));
        let client = Client::new(options).unwrap();
        push_pull_and_cache(&client, &addr, &format!("mtls-{how:?}").to_lowercase()).await;
    }

    // Without the client certificate the registry ends the handshake, and the error says
    // what it wanted and where a certificate goes.
    let (options, dir) = trusting(Trust::SecretDir, &addr, &ca.cert, None);
    let err = Client::new(options)
        .unwrap()
        .get_manifest(&Repository::new(&addr, "mtls-flag/app").unwrap(), "v1")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Certificate { .. }), "{err:?}");
    assert!(err.to_string().starts_with(&addr), "{err}");
    assert_contains(
        &err.to_string(),
        &[
            "the registry asks for a TLS client certificate and none is configured",
            &format!("--registry-client-cert {addr}=CERT,KEY"),
            &format!("NAME.cert and NAME.key in {}/", dir.path().display()),
        ],
    );

    // A client certificate the registry does not accept (another CA's) is named.
    let other_ca = certs.ca("other-ca", "Other CA");
    let stranger = certs.leaf("stranger", &other_ca, "stranger", None, "clientAuth");
    let (options, _dir) = trusting(Trust::CertsD, &addr, &ca.cert, Some(&stranger));
    let err = Client::new(options).unwrap().ping(&addr).await.unwrap_err();
    assert_contains(
        &err.to_string(),
        &[
            "the registry asked for a TLS client certificate and was given a certificate",
            "subject \"CN=stranger\", issued by \"CN=Other CA\"",
        ],
    );

    // skopeo reads the same directory layout.
    let cert_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&ca.cert, cert_dir.path().join("ca.crt")).unwrap();
    std::fs::copy(&client_cert.cert, cert_dir.path().join("client.cert")).unwrap();
    std::fs::copy(&client_cert.key, cert_dir.path().join("client.key")).unwrap();
    skopeo_pull(
        &format!("{addr}/mtls-certsd/app:v1"),
        &[
            "--src-cert-dir".into(),
            cert_dir.path().display().to_string(),
        ],
    )
    .await;
}

/// Every error a misconfigured certificate setup produces, none showing any part of a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_private_key_content_appears_in_any_error() {
    let certs = Certs::new();
    let ca = certs.ca("ca", "Kiln Test CA");
    let server = certs.leaf(
        "registry",
        &ca,
        "registry",
        Some("IP:127.0.0.1"),
        "serverAuth",
    );
    let client_cert = certs.leaf("client", &ca, "kiln builder", None, "clientAuth");
    let other = certs.self_signed("other", "other", Some("DNS:other.test"));
    let registry = tls_registry(&server, &[&ca.cert]);
    let addr = registry.addr();
    let keys = [&ca.key, &server.key, &client_cert.key, &other.key];

    // A key whose base64 is broken halfway, as a bad copy and paste leaves it.
    let broken_key = certs.dir().join("broken.key");
    let key_text = std::fs::read_to_string(&client_cert.key).unwrap();
    let mut lines: Vec<&str> = key_text.lines().collect();
    lines[5] = "!!!! not base64 at all !!!!";
    std::fs::write(&broken_key, lines.join("\n")).unwrap();

    let mut shown: Vec<String> = Vec::new();
    let mut record = |err: &Error| {
        shown.push(err.to_string());
        shown.push(format!("{err:?}"));
    };

    // A key given where a certificate is expected, and the other way round.
    let mut options = test_options(Keychain::anonymous());
    options
        .add_registry_certificate(&format!("{addr}={}", server.key.display()))
        .unwrap();
    record(&Client::new(options).unwrap_err());
    for (cert, key) in [
        (&client_cert.key, &client_cert.key),
        (&client_cert.cert, &other.key),
        (&client_cert.cert, &broken_key),
        (&client_cert.cert, &client_cert.cert),
    ] {
        let mut options = test_options(Keychain::anonymous());
        options
            .add_registry_client_certificate(&format!(
                "{addr}={},{}",
                cert.display(),
                key.display()
            ))
            .unwrap();
        record(&Client::new(options).unwrap_err());
    }

    // The same mistakes in certificate directories: by registry (read when the client is
    // made) and under a certs.d directory (read then, reported when the registry is used).
    let layouts: [&[(&str, &Path)]; 4] = [
        &[("ca.crt", &server.key)],
        &[
            ("client.cert", &client_cert.cert),
            ("client.key", &other.key),
        ],
        &[
            ("client.cert", &client_cert.cert),
            ("client.key", &broken_key),
        ],
        &[("ca.crt", &ca.cert), ("client.key", &client_cert.key)],
    ];
    for files in layouts {
        let secret = tempfile::tempdir().unwrap();
        kubelet_secret_mount(secret.path(), files);
        let mut options = test_options(Keychain::anonymous());
        options
            .add_registry_certs_dir(&format!("{addr}={}", secret.path().display()))
            .unwrap();
        let err = Client::new(options).unwrap_err();
        assert!(matches!(err, Error::Tls { .. }), "{err:?}");
        record(&err);

        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(&addr)).unwrap();
        for (name, source) in files {
            std::fs::copy(source, root.path().join(&addr).join(name)).unwrap();
        }
        let mut options = test_options(Keychain::anonymous());
        options
            .add_registry_certs_dir(&root.path().display().to_string())
            .unwrap();
        let client = Client::new(options).unwrap();
        let err = client.ping(&addr).await.unwrap_err();
        assert!(matches!(err, Error::Tls { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr), "{err}");
        record(&err);
    }

    // Refused handshakes: no client certificate, and a server certificate not trusted.
    let (options, _dir) = trusting(Trust::CertsD, &addr, &ca.cert, None);
    record(&Client::new(options).unwrap().ping(&addr).await.unwrap_err());
    let (options, _dir) = trusting(Trust::CertsD, &addr, &other.cert, Some(&client_cert));
    let client = Client::new(options).unwrap();
    let err = client.ping(&addr).await.unwrap_err();
    assert!(matches!(err, Error::Certificate { .. }), "{err:?}");
    record(&err);
    shown.push(format!("{client:?}"));

    assert!(shown.len() >= 20, "{}", shown.len());
    for key in keys {
        let text = std::fs::read_to_string(key).unwrap();
        let body: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .collect();
        assert!(body.len() > 10, "{}", key.display());
        for message in &shown {
            assert!(!message.contains("PRIVATE KEY-----"), "{message}");
            for line in &body {
                assert!(!message.contains(line), "key content in: {message}");
                assert!(!message.contains(&line[..16]), "key content in: {message}");
            }
        }
    }
}

//! htpasswd Basic auth over TLS with a CA made by the test; credentials from a mounted
//! docker config Secret or a credential helper.

use std::os::unix::fs::PermissionsExt as _;

use kiln_registry::{Client, Credential, Error, Keychain, RegistryOptions, Repository, Secret};
use kiln_testkit::{Registry, RegistryConfig};

use crate::support::*;

const USER: &str = "builder";
const PASSWORD: &str = "s3cret-Pa55word-do-not-print";

struct TlsRegistry {
    registry: Registry,
    tls: TestTls,
    _auth_dir: tempfile::TempDir,
}

fn start_tls_registry() -> TlsRegistry {
    let tls = make_tls();
    let auth_dir = tempfile::tempdir().unwrap();
    let htpasswd = htpasswd(auth_dir.path(), USER, PASSWORD);
    let registry = Registry::start_with(RegistryConfig {
        auth: Some(format!(
            "htpasswd:\n  realm: kiln-test\n  path: {}",
            htpasswd.display()
        )),
        tls: Some((tls.cert.clone(), tls.key.clone())),
        ..RegistryConfig::default()
    });
    TlsRegistry {
        registry,
        tls,
        _auth_dir: auth_dir,
    }
}

fn tls_options(keychain: Keychain, registry: &str, tls: &TestTls) -> RegistryOptions {
    let mut options = test_options(keychain);
    options
        .add_registry_certificate(&format!("{registry}={}", tls.ca.display()))
        .unwrap();
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_over_tls_with_mounted_secret() {
    let TlsRegistry {
        registry,
        tls,
        _auth_dir: _htpasswd_dir,
    } = start_tls_registry();
    let addr = registry.addr();
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { format!("https://{addr}/v2/"): basic_auth_entry(USER, PASSWORD) }
    }));
    let client = Client::new(tls_options(keychain_for(secret.path()), &addr, &tls)).unwrap();
    let repo = Repository::new(&addr, "secure/app").unwrap();
    let image = make_image("basic over tls", 200_000);
    assert_eq!(
        push_with_kiln(&client, &repo, &image, "v1").await,
        image.manifest_digest
    );

    let cert_dir = tls.cert_dir.display().to_string();
    let creds = format!("{USER}:{PASSWORD}");
    let pulled = skopeo_pull(
        &format!("{addr}/secure/app:v1"),
        &[
            "--src-cert-dir".into(),
            cert_dir.clone(),
            "--src-creds".into(),
            creds.clone(),
        ],
    )
    .await;
    assert_eq!(pulled, image.manifest_digest);

    let other = make_image("skopeo over tls", 30_000);
    let skopeo_digest = skopeo_push(
        &other,
        &format!("{addr}/secure/from-skopeo:latest"),
        &[
            "--dest-cert-dir".into(),
            cert_dir,
            "--dest-creds".into(),
            creds,
        ],
    )
    .await;
    let into = tempfile::tempdir().unwrap();
    let from_skopeo = Repository::new(&addr, "secure/from-skopeo").unwrap();
    assert_eq!(
        pull_with_kiln(&client, &from_skopeo, "latest", into.path()).await,
        skopeo_digest
    );
    assert_eq!(
        client.list_tags(&from_skopeo).await.unwrap(),
        vec!["latest".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_names_registry_and_401_without_the_secret() {
    let TlsRegistry {
        registry,
        tls,
        _auth_dir: _htpasswd_dir,
    } = start_tls_registry();
    let addr = registry.addr();
    let wrong = "wrong-Pa55word-also-secret";
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): { "username": USER, "password": wrong } }
    }));
    let client = Client::new(tls_options(keychain_for(secret.path()), &addr, &tls)).unwrap();
    let repo = Repository::new(&addr, "secure/app").unwrap();
    let image = make_image("refused", 1_000);
    let (digest, path, _) = image.blobs[0].clone();
    let err = client
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
    let text = err.to_string();
    assert!(text.starts_with(&format!("{addr}/secure/app: ")), "{text}");
    assert!(text.contains("401 Unauthorized"), "{text}");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401));
    for shown in [text.clone(), format!("{err:?}"), format!("{client:?}")] {
        assert!(!shown.contains(wrong), "secret leaked: {shown}");
    }

    let pull_err = client
        .get_manifest(&repo, "v1")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        pull_err.contains(&addr) && pull_err.contains("401"),
        "{pull_err}"
    );
    assert!(!pull_err.contains(wrong));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_helper_supplies_the_password() {
    let TlsRegistry {
        registry,
        tls,
        _auth_dir: _htpasswd_dir,
    } = start_tls_registry();
    let addr = registry.addr();
    let bin = tempfile::tempdir().unwrap();
    let asked = bin.path().join("asked");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nserver=$(cat)\nprintf '%s\\n' \"$server\" >> {asked}\nif [ \"$server\" = \"{addr}\" ]; then\n  printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\nelse\n  echo 'credentials not found in native keychain'\n  exit 1\nfi\n",
        asked = asked.display()
    );
    let helper = bin.path().join("docker-credential-test");
    std::fs::write(&helper, script).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();

    for config in [
        serde_json::json!({ "credHelpers": { addr.clone(): "test" } }),
        serde_json::json!({ "credsStore": "test", "auths": { addr.clone(): {} } }),
    ] {
        let secret = mounted_docker_config(&config);
        let keychain = keychain_for(secret.path()).with_helper_path(bin.path());
        let client = Client::new(tls_options(keychain, &addr, &tls)).unwrap();
        let repo = Repository::new(&addr, "helped/app").unwrap();
        let image = make_image("helper", 2_000);
        assert_eq!(
            push_with_kiln(&client, &repo, &image, "v1").await,
            image.manifest_digest
        );
    }
    let asked = std::fs::read_to_string(&asked).unwrap();
    assert!(asked.lines().all(|l| l == addr), "{asked}");

    // A registry the helper does not know is accessed anonymously, and refused.
    let secret = mounted_docker_config(&serde_json::json!({ "credsStore": "test" }));
    let keychain = keychain_for(secret.path()).with_helper_path(bin.path());
    let localhost = format!("localhost:{}", registry.socket_addr().port());
    let mut options = test_options(keychain);
    options
        .add_registry_certificate(&format!("{localhost}={}", tls.ca.display()))
        .unwrap();
    let client = Client::new(options).unwrap();
    let err = client
        .get_manifest(&Repository::new(&localhost, "helped/app").unwrap(), "v1")
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");

    // A helper that is not installed is an error naming it.
    let secret = mounted_docker_config(&serde_json::json!({ "credsStore": "absent" }));
    let keychain = keychain_for(secret.path()).with_helper_path(bin.path());
    let client = Client::new(tls_options(keychain, &addr, &tls)).unwrap();
    let err = client
        .get_manifest(&Repository::new(&addr, "helped/app").unwrap(), "v1")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CredentialHelper { .. }), "{err}");
    assert!(
        err.to_string().contains("docker-credential-absent"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ca_fails_unless_verification_is_skipped() {
    let TlsRegistry {
        registry,
        tls,
        _auth_dir: _htpasswd_dir,
    } = start_tls_registry();
    let addr = registry.addr();
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): basic_auth_entry(USER, PASSWORD) }
    }));
    let client = Client::new(test_options(keychain_for(secret.path()))).unwrap();
    let err = client.ping(&addr).await.unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with(&addr), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    let skipping = Client::new(RegistryOptions {
        skip_tls_verify_registries: vec![addr.clone()],
        ..test_options(keychain_for(secret.path()))
    })
    .unwrap();
    let repo = Repository::new(&addr, "unverified").unwrap();
    let image = make_image("skip verify", 1_000);
    assert_eq!(
        push_with_kiln(&skipping, &repo, &image, "v1").await,
        image.manifest_digest
    );

    // The CA given for all registries works as well as per registry.
    let global_ca = Client::new(RegistryOptions {
        ca_certificates: vec![tls.ca.clone()],
        ..test_options(keychain_for(secret.path()))
    })
    .unwrap();
    assert_eq!(
        global_ca.get_manifest(&repo, "v1").await.unwrap().digest,
        image.manifest_digest
    );
}

#[test]
fn credentials_never_show_in_debug_output() {
    let secret = mounted_docker_config(&serde_json::json!({
        "auths": {
            "a.example": basic_auth_entry(USER, PASSWORD),
            "b.example": { "username": USER, "password": PASSWORD },
            "c.example": { "identitytoken": PASSWORD },
            "d.example": { "registrytoken": PASSWORD },
        }
    }));
    let keychain = keychain_for(secret.path());
    let config = keychain.config().unwrap();
    let mut shown = vec![format!("{keychain:?}"), format!("{config:?}")];
    for host in ["a.example", "b.example", "c.example", "d.example"] {
        let credential = config.auth_for(host).unwrap();
        shown.push(format!("{credential:?}"));
    }
    let options = RegistryOptions {
        keychain,
        ..RegistryOptions::default()
    };
    shown.push(format!("{options:?}"));
    shown.push(format!("{:?}", Client::new(options).unwrap()));
    for text in shown {
        assert!(!text.contains(PASSWORD), "secret in debug output: {text}");
        let encoded = basic_auth_entry(USER, PASSWORD)["auth"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            !text.contains(&encoded),
            "encoded secret in debug output: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_for_mutual_tls() {
    let registry = Registry::start();
    let tls = make_tls();
    let proxy = start_mtls_proxy(registry.socket_addr(), &tls)
        .await
        .to_string();
    let repo = Repository::new(&proxy, "mtls/app").unwrap();
    let image = make_image("mutual tls", 20_000);

    let mut options = tls_options(Keychain::anonymous(), &proxy, &tls);
    options
        .add_registry_client_certificate(&format!(
            "{proxy}={},{}",
            tls.client_cert.display(),
            tls.client_key.display()
        ))
        .unwrap();
    let client = Client::new(options).unwrap();
    assert_eq!(
        push_with_kiln(&client, &repo, &image, "v1").await,
        image.manifest_digest
    );
    let pulled = skopeo_pull(
        &format!("{proxy}/mtls/app:v1"),
        &[
            "--src-cert-dir".into(),
            tls.client_cert_dir.display().to_string(),
        ],
    )
    .await;
    assert_eq!(pulled, image.manifest_digest);

    // Without the client certificate the handshake is refused (and plain HTTP is no way in);
    // the error says a client certificate was asked for.
    let without = Client::new(tls_options(Keychain::anonymous(), &proxy, &tls)).unwrap();
    let err = without.get_manifest(&repo, "v1").await.unwrap_err();
    assert!(matches!(err, Error::Certificate { .. }), "{err}");
    assert!(err.to_string().contains("client certificate"), "{err}");
    assert!(err.to_string().starts_with(&proxy), "{err}");
}

/// A CI job's credentials (what the executor's gitlab provider adds from `$CI_REGISTRY_*`)
/// reach a registry the mounted config says nothing about, and never override the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_credentials_are_used_only_where_the_config_has_none() {
    let TlsRegistry {
        registry,
        tls,
        _auth_dir: _htpasswd_dir,
    } = start_tls_registry();
    let addr = registry.addr();
    let basic = |password: &str| Credential::Basic {
        username: USER.into(),
        password: Secret::new(password),
    };
    let image = make_image("from the job's environment", 10_000);
    let repo = Repository::new(&addr, "secure/ci").unwrap();

    // The config knows only another registry: the fallback is used.
    let other_only = mounted_docker_config(&serde_json::json!({
        "auths": { "other.example:5000": basic_auth_entry(USER, "not-this-one") }
    }));
    let keychain = keychain_for(other_only.path()).with_fallback(&addr, basic(PASSWORD));
    let client = Client::new(tls_options(keychain, &addr, &tls)).unwrap();
    assert_eq!(
        push_with_kiln(&client, &repo, &image, "v1").await,
        image.manifest_digest
    );

    // The config has the right password, the fallback a wrong one: the config wins.
    let right = mounted_docker_config(&serde_json::json!({
        "auths": { addr.clone(): basic_auth_entry(USER, PASSWORD) }
    }));
    let keychain = keychain_for(right.path()).with_fallback(&addr, basic("wrong-password"));
    let client = Client::new(tls_options(keychain, &addr, &tls)).unwrap();
    assert_eq!(
        push_with_kiln(&client, &repo, &image, "v2").await,
        image.manifest_digest
    );

    // A wrong fallback and nothing in the config: refused, as without any credential.
    let keychain = Keychain::anonymous().with_fallback(&addr, basic("wrong-password"));
    let client = Client::new(tls_options(keychain, &addr, &tls)).unwrap();
    let refused = client.list_tags(&repo).await.unwrap_err().to_string();
    assert!(refused.contains("401"), "{refused}");
    assert!(!refused.contains("wrong-password"), "{refused}");
}

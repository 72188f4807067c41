//! Shared parts of the registry integration tests: test images, skopeo as the reference
//! client, a kubelet-style mounted docker config, a test CA, a token issuer for distribution's
//! `auth: token` mode, and a fault-injecting proxy for failures a real registry can't produce
//! on demand.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use kiln_oci::{Digest, MediaType};
use kiln_registry::{Client, FileSource, Keychain, PushBlobOptions, RegistryOptions, Repository};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A one-layer OCI image in a layout directory, made by kiln-testkit with system tar+gzip.
pub struct TestImage {
    pub layout: tempfile::TempDir,
    pub manifest_digest: Digest,
    pub manifest: Bytes,
    pub media_type: MediaType,
    /// Config then layers: digest, file in the layout, size.
    pub blobs: Vec<(Digest, PathBuf, u64)>,
}

/// Makes an image whose layer holds a few files, including one of `payload_size`
/// pseudo-random bytes (so uploads span several chunks and gzip can't shrink it away).
pub fn make_image(label: &str, payload_size: usize) -> TestImage {
    let rootfs = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(rootfs.path().join("etc")).unwrap();
    std::fs::write(rootfs.path().join("etc/label"), label).unwrap();
    let mut state: u64 = label.bytes().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let payload: Vec<u8> = (0..payload_size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    std::fs::write(rootfs.path().join("payload.bin"), payload).unwrap();
    let layout = tempfile::tempdir().unwrap();
    let digest =
        kiln_testkit::image::oci_layout_from_rootfs(rootfs.path(), layout.path(), "latest");
    let manifest_digest = Digest::parse(&digest).unwrap();
    let blob_path = |d: &Digest| {
        layout
            .path()
            .join("blobs")
            .join(d.algorithm().name())
            .join(d.hex())
    };
    let manifest = Bytes::from(std::fs::read(blob_path(&manifest_digest)).unwrap());
    let doc: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut blobs = Vec::new();
    let descriptors = std::iter::once(&doc["config"]).chain(doc["layers"].as_array().unwrap());
    for descriptor in descriptors {
        let d = Digest::parse(descriptor["digest"].as_str().unwrap()).unwrap();
        let size = descriptor["size"].as_u64().unwrap();
        blobs.push((d.clone(), blob_path(&d), size));
    }
    TestImage {
        media_type: MediaType::parse(doc["mediaType"].as_str().unwrap()),
        layout,
        manifest_digest,
        manifest,
        blobs,
    }
}

/// Pushes `image` with kiln-registry: every blob from its file (digest known), then the
/// manifest under `tag`. Returns the manifest digest the client reports.
pub async fn push_with_kiln(
    client: &Client,
    repo: &Repository,
    image: &TestImage,
    tag: &str,
) -> Digest {
    for (digest, path, size) in &image.blobs {
        let source = FileSource::new(path).await.unwrap();
        let pushed = client
            .push_blob(
                repo,
                &source,
                &PushBlobOptions {
                    digest: Some(digest.clone()),
                    mount_from: None,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("push of {digest} failed: {e}"));
        assert_eq!(&pushed.digest, digest);
        assert_eq!(pushed.size, Some(*size));
    }
    client
        .put_manifest(repo, tag, &image.media_type, image.manifest.clone())
        .await
        .unwrap_or_else(|e| panic!("manifest push failed: {e}"))
}

/// Pulls `repo:tag` with kiln-registry into a directory of blobs named by hex digest, checks
/// every blob's size against the manifest, and returns the manifest digest.
pub async fn pull_with_kiln(client: &Client, repo: &Repository, tag: &str, into: &Path) -> Digest {
    let manifest = client
        .get_manifest(repo, tag)
        .await
        .unwrap_or_else(|e| panic!("manifest pull failed: {e}"));
    let doc: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap();
    let descriptors = std::iter::once(&doc["config"]).chain(doc["layers"].as_array().unwrap());
    for descriptor in descriptors {
        let digest = Digest::parse(descriptor["digest"].as_str().unwrap()).unwrap();
        let path = into.join(digest.hex());
        let mut file = tokio::fs::File::create(&path).await.unwrap();
        let size = client
            .pull_blob_to(repo, &digest, &mut file)
            .await
            .unwrap_or_else(|e| panic!("blob pull of {digest} failed: {e}"));
        assert_eq!(size, descriptor["size"].as_u64().unwrap());
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(Digest::sha256_of(&on_disk), digest);
    }
    // The manifest must be retrievable by its digest too, and verify.
    let by_digest = client
        .get_manifest(repo, &manifest.digest.to_string())
        .await
        .unwrap();
    assert_eq!(by_digest.bytes, manifest.bytes);
    manifest.digest
}

/// Runs skopeo (asynchronously, so servers in this test's runtime keep answering) and
/// returns stdout; panics with stderr on failure.
pub async fn skopeo(args: &[String]) -> String {
    kiln_testkit::require_tools(&["skopeo"]);
    let out = tokio::process::Command::new("skopeo")
        .args(args)
        .output()
        .await
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `skopeo copy docker://SRC oci:DIR:latest`; returns the manifest digest skopeo read.
pub async fn skopeo_pull(source: &str, transport_args: &[String]) -> Digest {
    let dir = tempfile::tempdir().unwrap();
    let digest_file = dir.path().join("digest");
    let mut args: Vec<String> = vec!["copy".into(), "--quiet".into(), "--digestfile".into()];
    args.push(digest_file.display().to_string());
    args.extend(transport_args.iter().cloned());
    args.push(format!("docker://{source}"));
    args.push(format!(
        "oci:{}:latest",
        dir.path().join("layout").display()
    ));
    skopeo(&args).await;
    Digest::parse(std::fs::read_to_string(&digest_file).unwrap().trim()).unwrap()
}

/// `skopeo copy oci:LAYOUT:latest docker://DEST`; returns the pushed manifest digest.
pub async fn skopeo_push(image: &TestImage, dest: &str, transport_args: &[String]) -> Digest {
    let dir = tempfile::tempdir().unwrap();
    let digest_file = dir.path().join("digest");
    let mut args: Vec<String> = vec!["copy".into(), "--quiet".into(), "--digestfile".into()];
    args.push(digest_file.display().to_string());
    args.extend(transport_args.iter().cloned());
    args.push(format!("oci:{}:latest", image.layout.path().display()));
    args.push(format!("docker://{dest}"));
    skopeo(&args).await;
    Digest::parse(std::fs::read_to_string(&digest_file).unwrap().trim()).unwrap()
}

/// A directory laid out as a kubelet mounts a `kubernetes.io/dockerconfigjson` Secret with
/// `items: [{key: .dockerconfigjson, path: config.json}]`: the file lives in a timestamped
/// directory, reached through the `..data` symlink.
pub fn mounted_docker_config(config_json: &serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let versioned = dir.path().join("..2026_11_22_04_00_00.000000001");
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(
        versioned.join("config.json"),
        serde_json::to_vec_pretty(config_json).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink(versioned.file_name().unwrap(), dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.json", dir.path().join("config.json")).unwrap();
    dir
}

/// A keychain that searches only the given mounted directory (as `DOCKER_CONFIG` would
/// point to), never the process environment.
pub fn keychain_for(mounted: &Path) -> Keychain {
    Keychain::from_search_dirs(&[mounted.to_owned()]).unwrap()
}

/// Options with fast retries, for tests.
pub fn test_options(keychain: Keychain) -> RegistryOptions {
    RegistryOptions {
        keychain,
        retry_initial_delay: std::time::Duration::from_millis(20),
        retry_max_delay: std::time::Duration::from_secs(2),
        ..RegistryOptions::default()
    }
}

pub fn basic_auth_entry(user: &str, password: &str) -> serde_json::Value {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({ "auth": auth })
}

/// A CA and a server certificate for 127.0.0.1/localhost signed by it, as PEM files.
pub struct TestTls {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A directory with `ca.crt`, for skopeo's `--src-cert-dir`/`--dest-cert-dir`.
    pub cert_dir: PathBuf,
    /// A client certificate and key signed by the same CA, for mutual TLS.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Like `cert_dir`, plus the client certificate as `client.cert`/`client.key`.
    pub client_cert_dir: PathBuf,
    pub ca_der: Vec<u8>,
    pub server_cert_der: Vec<u8>,
    pub server_key_der: Vec<u8>,
}

pub fn make_tls() -> TestTls {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kiln test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params
        .distinguished_name
        .push(DnType::CommonName, "kiln test registry");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "kiln test client");
    let client_cert = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
    let paths = TestTls {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        cert_dir: dir.path().join("certs.d"),
        client_cert: dir.path().join("client.pem"),
        client_key: dir.path().join("client-key.pem"),
        client_cert_dir: dir.path().join("client-certs.d"),
        ca_der: ca.der().to_vec(),
        server_cert_der: cert.der().to_vec(),
        server_key_der: key.serialize_der(),
        _dir: dir,
    };
    std::fs::write(&paths.client_cert, client_cert.pem()).unwrap();
    std::fs::write(&paths.client_key, client_key.serialize_pem()).unwrap();
    std::fs::create_dir(&paths.client_cert_dir).unwrap();
    std::fs::write(paths.client_cert_dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(paths.client_cert_dir.join("client.cert"), client_cert.pem()).unwrap();
    std::fs::write(
        paths.client_cert_dir.join("client.key"),
        client_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(&paths.ca, ca.pem()).unwrap();
    std::fs::write(&paths.cert, cert.pem()).unwrap();
    std::fs::write(&paths.key, key.serialize_pem()).unwrap();
    std::fs::create_dir(&paths.cert_dir).unwrap();
    std::fs::write(paths.cert_dir.join("ca.crt"), ca.pem()).unwrap();
    paths
}

/// An htpasswd file with one bcrypt entry (distribution accepts only bcrypt).
pub fn htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    kiln_testkit::require_tools(&["htpasswd"]);
    let line =
        kiln_testkit::run(std::process::Command::new("htpasswd").args(["-Bbn", user, password]));
    let path = dir.join("htpasswd");
    std::fs::write(&path, line.trim()).unwrap();
    path
}

/// Reads one HTTP/1.1 request head (and returns any body bytes read past it).
async fn read_head(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            return Some((head, buf[end + 4..].to_vec()));
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        // A TLS ClientHello (the client trying HTTPS first): hang up at once, as an HTTP
        // server's error answer would, instead of waiting for a request that never comes.
        if buf[0] == 0x16 {
            return None;
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A token issuer for distribution's `auth: token` mode: checks Basic credentials (GET) or a
/// refresh token (OAuth2 POST) and issues ES256 JWTs whose `x5c` certificate is the one in
/// the registry's `rootcertbundle`.
pub struct TokenServer {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub root_cert: PathBuf,
    pub issuer: String,
    pub service: String,
    signer: Arc<Signer>,
    _dir: tempfile::TempDir,
}

struct Signer {
    key: ring::signature::EcdsaKeyPair,
    cert_der: Vec<u8>,
}

impl TokenServer {
    pub async fn start(user: &str, password: &str, refresh_token: &str) -> TokenServer {
        Self::start_with_lifetime(user, password, refresh_token, 300).await
    }

    /// Like `start`, announcing `expires_in` seconds of validity (the JWT itself stays valid
    /// for at least five minutes, so only the client's cache decides when to renew).
    pub async fn start_with_lifetime(
        user: &str,
        password: &str,
        refresh_token: &str,
        expires_in: u64,
    ) -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["kiln-token-issuer".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kiln token issuer");
        let cert = params.self_signed(&key_pair).unwrap();
        let root_cert = dir.path().join("token-root.pem");
        std::fs::write(&root_cert, cert.pem()).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &rng,
        )
        .unwrap();
        let signer = Arc::new(Signer {
            key,
            cert_der: cert.der().to_vec(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let server = TokenServer {
            addr,
            requests: requests.clone(),
            root_cert,
            issuer: "kiln-test-issuer".into(),
            service: "kiln-test-registry".into(),
            signer: signer.clone(),
            _dir: dir,
        };
        let expected_basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let (issuer, service) = (server.issuer.clone(), server.service.clone());
        let refresh_token = refresh_token.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (signer, requests) = (signer.clone(), requests.clone());
                let (expected_basic, issuer, service, refresh_token) = (
                    expected_basic.clone(),
                    issuer.clone(),
                    service.clone(),
                    refresh_token.clone(),
                );
                tokio::spawn(async move {
                    let Some((head, mut body)) = read_head(&mut conn).await else {
                        return;
                    };
                    requests.fetch_add(1, Ordering::SeqCst);
                    let length: usize = header(&head, "content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while body.len() < length {
                        let mut chunk = vec![0u8; length - body.len()];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => body.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let request_line = head.lines().next().unwrap_or("");
                    let target = request_line.split(' ').nth(1).unwrap_or("");
                    let query = target.split_once('?').map_or("", |(_, q)| q);
                    let (subject, scopes, asked_service) = if request_line.starts_with("POST ") {
                        let form: Vec<(String, String)> =
                            url::form_urlencoded::parse(&body).into_owned().collect();
                        let get =
                            |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                        let ok = get("grant_type").as_deref() == Some("refresh_token")
                            && get("refresh_token").as_deref() == Some(refresh_token.as_str());
                        let scopes: Vec<String> = get("scope")
                            .unwrap_or_default()
                            .split(' ')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect();
                        (
                            ok.then(|| "refresh-user".to_owned()),
                            scopes,
                            get("service"),
                        )
                    } else {
                        let pairs: Vec<(String, String)> =
                            url::form_urlencoded::parse(query.as_bytes())
                                .into_owned()
                                .collect();
                        let scopes = pairs
                            .iter()
                            .filter(|(k, _)| k == "scope")
                            .map(|(_, v)| v.clone())
                            .collect();
                        let svc = pairs
                            .iter()
                            .find(|(k, _)| k == "service")
                            .map(|(_, v)| v.clone());
                        let ok = header(&head, "authorization")
                            == Some(&format!("Basic {expected_basic}"));
                        (ok.then(|| "user".to_owned()), scopes, svc)
                    };
                    let response = match subject {
                        Some(subject) if asked_service.as_deref() == Some(service.as_str()) => {
                            let token =
                                sign_token(&signer, &issuer, &service, &subject, &scopes, 300);
                            let body = serde_json::json!({
                                "token": token, "access_token": token,
                                "expires_in": expires_in, "issued_at": rfc3339_now(),
                            });
                            let body = if request_line.starts_with("POST ") {
                                // OAuth2 answers carry only access_token.
                                serde_json::json!({"access_token": token, "expires_in": expires_in})
                                    .to_string()
                            } else {
                                body.to_string()
                            };
                            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        }
                        _ => {
                            let body = r#"{"details":"invalid credentials"}"#;
                            format!("HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        }
                    };
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        server
    }

    /// The registry's `auth:` section for this issuer.
    pub fn registry_auth_yaml(&self) -> String {
        format!(
            "token:\n  realm: http://{}/token\n  service: {}\n  issuer: {}\n  rootcertbundle: {}",
            self.addr,
            self.service,
            self.issuer,
            self.root_cert.display()
        )
    }

    /// A token granting `actions` on `repository`, for `registrytoken` tests.
    pub fn mint(&self, repository: &str, actions: &str) -> String {
        sign_token(
            &self.signer,
            &self.issuer,
            &self.service,
            "minted",
            &[format!("repository:{repository}:{actions}")],
            3600,
        )
    }
}

fn sign_token(
    signer: &Signer,
    issuer: &str,
    service: &str,
    subject: &str,
    scopes: &[String],
    lifetime: u64,
) -> String {
    let b64 = |data: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut access: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for scope in scopes {
        let mut parts = scope.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        access
            .entry((kind.to_owned(), name.to_owned()))
            .or_default()
            .extend(actions.split(',').map(str::to_owned));
    }
    let access: Vec<serde_json::Value> = access
        .into_iter()
        .map(|((kind, name), actions)| serde_json::json!({"type": kind, "name": name, "actions": actions}))
        .collect();
    let header = serde_json::json!({
        "typ": "JWT", "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(&signer.cert_der)],
    });
    let claims = serde_json::json!({
        "iss": issuer, "sub": subject, "aud": service,
        "exp": now + lifetime, "nbf": now - 10, "iat": now,
        "jti": format!("kiln-{now}-{}", scopes.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let rng = ring::rand::SystemRandom::new();
    let signature = signer.key.sign(&rng, signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64(signature.as_ref()))
}

/// A canned answer the proxy gives instead of forwarding, to the first `remaining` requests
/// whose request line satisfies `matches`.
pub struct Fault {
    pub matches: Box<dyn Fn(&str) -> bool + Send + Sync>,
    pub response: String,
    pub remaining: usize,
}

/// A TCP proxy in front of a registry that forces one request per connection (so it sees
/// every request line) and answers matching requests with a canned fault.
pub struct FaultProxy {
    pub addr: SocketAddr,
    pub faults_served: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr, faults: Vec<Fault>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Mutex::new(faults));
        let faults_served = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let proxy = FaultProxy {
            addr,
            faults_served: faults_served.clone(),
            requests: requests.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (faults, faults_served, requests) =
                    (faults.clone(), faults_served.clone(), requests.clone());
                tokio::spawn(async move {
                    let Some((head, early_body)) = read_head(&mut conn).await else {
                        return;
                    };
                    let request_line = head.lines().next().unwrap_or("").to_owned();
                    requests.lock().unwrap().push(request_line.clone());
                    let canned = {
                        let mut faults = faults.lock().unwrap();
                        faults
                            .iter_mut()
                            .find(|f| f.remaining > 0 && (f.matches)(&request_line))
                            .map(|f| {
                                f.remaining -= 1;
                                f.response.clone()
                            })
                    };
                    if let Some(response) = canned {
                        faults_served.fetch_add(1, Ordering::SeqCst);
                        // Drain the body so the client reads our answer instead of a reset.
                        let length: usize = header(&head, "content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let mut left = length.saturating_sub(early_body.len());
                        let mut sink = vec![0u8; 64 * 1024];
                        while left > 0 {
                            match conn.read(&mut sink[..left.min(64 * 1024)]).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => left -= n,
                            }
                        }
                        let _ = conn.write_all(response.as_bytes()).await;
                        let _ = conn.shutdown().await;
                        return;
                    }
                    let Ok(mut upstream_conn) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut rewritten = String::new();
                    for (i, line) in head.trim_end_matches("\r\n").split("\r\n").enumerate() {
                        if i > 0 && line.to_ascii_lowercase().starts_with("connection:") {
                            continue;
                        }
                        rewritten.push_str(line);
                        rewritten.push_str("\r\n");
                    }
                    rewritten.push_str("Connection: close\r\n\r\n");
                    if upstream_conn.write_all(rewritten.as_bytes()).await.is_err()
                        || upstream_conn.write_all(&early_body).await.is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream_conn).await;
                });
            }
        });
        proxy
    }
}

/// A raw HTTP response with an empty body.
pub fn empty_response(status: &str, extra_headers: &str) -> String {
    format!("HTTP/1.1 {status}\r\n{extra_headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

/// The current UTC time as RFC 3339, as token servers write `issued_at`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A TLS terminator in front of a plain-HTTP registry that demands a client certificate signed
/// by the test CA (distribution's `http.tls.clientcas`, which the test registry config does
/// not expose).
pub async fn start_mtls_proxy(upstream: SocketAddr, tls: &TestTls) -> SocketAddr {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(tls.ca_der.clone())).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(tls.server_cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls.server_key_der.clone())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls_conn) = acceptor.accept(conn).await else {
                    return;
                };
                let Ok(mut upstream_conn) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls_conn, &mut upstream_conn).await;
            });
        }
    });
    addr
}

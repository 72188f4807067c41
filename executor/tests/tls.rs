//! The executor against registries served over TLS the way users serve them: a certificate
//! made with Docker's documented `openssl req -x509` recipe (which OpenSSL 3 marks
//! `CA:TRUE`), trusted with `--registry-certificate` or `SSL_CERT_FILE`; and a registry
//! that demands client certificates, configured with `--registry-certs-dir` pointing at
//! directories laid out as a kubelet mounts a Secret. Each builds, pushes and fills then
//! hits the layer cache; a refusal tells the user what to do; no key shows in the output.

use std::path::Path;
use std::process::{Command, Output};

use kiln_testkit::certs::{kubelet_secret_mount, CertKey, Certs};
use kiln_testkit::{bases, Registry, RegistryConfig};

fn executor(args: &[String], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_executor"));
    command
        .args(args)
        // Nothing of the machine running the tests may leak in: no docker config, and no
        // certificate but the ones each run names.
        .env("DOCKER_CONFIG", "/nonexistent-kiln-test")
        .env_remove("KANIKO_NO_PUSH")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run executor")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A build of a context with a COPY and a RUN on the busybox base, pushed to `addr`, the
/// cache in the same registry; `extra` says how the registry is trusted.
fn build(work: &Path, addr: &str, run: &str, extra: &[String], env: &[(&str, &Path)]) -> Output {
    let context = work.join("context");
    if !context.exists() {
        std::fs::create_dir_all(context.join("files")).unwrap();
        std::fs::write(context.join("files/a.txt"), "a\n").unwrap();
        std::fs::write(
            context.join("Dockerfile"),
            format!(
                "FROM {addr}/base/busybox:latest\nCOPY files/ /srv/\nRUN echo made > /srv/made\n"
            ),
        )
        .unwrap();
    }
    let mut args = vec![
        format!("--context=dir://{}", context.display()),
        format!("--destination={addr}/out/app:{run}"),
        format!("--kiln-dir={}", work.join(format!("kiln-{run}")).display()),
        format!(
            "--digest-file={}",
            work.join(format!("digest-{run}")).display()
        ),
        "--cache".to_owned(),
        format!("--cache-repo={addr}/out/cache"),
        "--mode=chroot".to_owned(),
        "--progress=plain".to_owned(),
        "--verbosity=trace".to_owned(),
    ];
    args.extend(extra.iter().cloned());
    executor(&args, env)
}

/// skopeo's view of the pushed tag: its digest must be the one the build wrote.
fn check_pushed(work: &Path, addr: &str, run: &str, cert_dir: &Path) {
    let digest = std::fs::read_to_string(work.join(format!("digest-{run}"))).unwrap();
    let inspected = kiln_testkit::run(
        Command::new("skopeo")
            .args(["inspect", "--format", "{{.Digest}}", "--cert-dir"])
            .arg(cert_dir)
            .arg(format!("docker://{addr}/out/app:{run}")),
    );
    assert_eq!(inspected.trim(), digest.trim());
}

/// Pushes the busybox base with skopeo, trusting (and presenting) what `cert_dir` holds.
fn push_base(addr: &str, cert_dir: &Path) {
    kiln_testkit::run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-cert-dir"])
            .arg(cert_dir)
            .arg(format!("oci:{}:latest", bases::busybox_layout().display()))
            .arg(format!("docker://{addr}/base/busybox:latest")),
    );
}

fn assert_no_key(output: &str, keys: &[&CertKey]) {
    assert!(!output.contains("PRIVATE KEY"), "{output}");
    for key in keys {
        let text = std::fs::read_to_string(&key.key).unwrap();
        for line in text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !output.contains(line),
                "key content in the output: {output}"
            );
        }
    }
}

#[test]
fn an_openssl3_self_signed_registry_trusted_by_flag_or_ssl_cert_file() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "openssl"]);
    let certs = Certs::new();
    let server = certs.self_signed("registry", "127.0.0.1", Some("IP:127.0.0.1"));
    assert!(server.text().contains("CA:TRUE"));
    let registry = Registry::start_with(RegistryConfig {
        tls: Some((server.cert.clone(), server.key.clone())),
        ..RegistryConfig::default()
    });
    let addr = registry.addr();
    let cert_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&server.cert, cert_dir.path().join("ca.crt")).unwrap();
    push_base(&addr, cert_dir.path());
    let work = tempfile::tempdir().unwrap();

    // Not trusted: the build fails before anything runs, and says how to trust it.
    let out = build(work.path(), &addr, "untrusted", &[], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    for part in [
        "error: ",
        &addr,
        "TLS certificate not trusted",
        &server.fingerprint(),
        &format!("--registry-certificate {addr}=FILE"),
    ] {
        assert!(last.contains(part), "{part:?} missing from: {last}");
    }
    assert_no_key(&err, &[&server]);

    let flag = format!("--registry-certificate={addr}={}", server.cert.display());
    let out = build(work.path(), &addr, "flag", &[flag], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("pushed {addr}/out/app:flag")),
        "{err}"
    );
    check_pushed(work.path(), &addr, "flag", cert_dir.path());
    assert_no_key(&err, &[&server]);

    // The same certificate as the system's bundle, as a Pod sets SSL_CERT_FILE: every step
    // now comes from the cache the first build filled over TLS.
    let out = build(
        work.path(),
        &addr,
        "env",
        &[],
        &[("SSL_CERT_FILE", server.cert.as_path())],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("CACHED"), "{err}");
    check_pushed(work.path(), &addr, "env", cert_dir.path());
}

#[test]
fn a_client_certificate_registry_through_mounted_certs_dirs() {
    kiln_testkit::require_tools(&["docker-registry", "skopeo", "openssl"]);
    let certs = Certs::new();
    let ca = certs.ca("ca", "Kiln Test CA");
    let server = certs.leaf(
        "registry",
        &ca,
        "registry",
        Some("IP:127.0.0.1"),
        "serverAuth",
    );
    let client = certs.leaf("client", &ca, "kiln builder", None, "clientAuth");
    let registry = Registry::start_with(RegistryConfig {
        tls: Some((server.cert.clone(), server.key.clone())),
        client_cas: vec![ca.cert.clone()],
        ..RegistryConfig::default()
    });
    let addr = registry.addr();
    let cert_dir = tempfile::tempdir().unwrap();
    for (name, source) in [
        ("ca.crt", &ca.cert),
        ("client.cert", &client.cert),
        ("client.key", &client.key),
    ] {
        std::fs::copy(source, cert_dir.path().join(name)).unwrap();
    }
    push_base(&addr, cert_dir.path());
    let work = tempfile::tempdir().unwrap();
    let keys = [&ca, &server, &client];

    // A Secret with the keys ca.crt, client.cert and client.key, for this registry.
    let secret = tempfile::tempdir().unwrap();
    kubelet_secret_mount(
        secret.path(),
        &[
            ("ca.crt", &ca.cert),
            ("client.cert", &client.cert),
            ("client.key", &client.key),
        ],
    );
    let flag = format!("--registry-certs-dir={addr}={}", secret.path().display());
    let out = build(work.path(), &addr, "secret", &[flag], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    check_pushed(work.path(), &addr, "secret", cert_dir.path());
    assert_no_key(&err, &keys);

    // A certs.d tree as a Secret mounted with items paths HOST:PORT/ca.crt and so on.
    let tree = tempfile::tempdir().unwrap();
    let items: Vec<(String, &Path)> = [
        ("ca.crt", &ca.cert),
        ("client.cert", &client.cert),
        ("client.key", &client.key),
    ]
    .into_iter()
    .map(|(name, source)| (format!("{addr}/{name}"), source.as_path()))
    .collect();
    let items: Vec<(&str, &Path)> = items.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    kubelet_secret_mount(tree.path(), &items);
    let flag = format!("--registry-certs-dir={}", tree.path().display());
    let out = build(work.path(), &addr, "tree", &[flag], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("CACHED"), "{err}");
    check_pushed(work.path(), &addr, "tree", cert_dir.path());
    assert_no_key(&err, &keys);

    // The CA alone: the registry ends the handshake, and the error says it wanted a client
    // certificate, without showing a key.
    let ca_only = tempfile::tempdir().unwrap();
    kubelet_secret_mount(ca_only.path(), &[("ca.crt", &ca.cert)]);
    let flag = format!("--registry-certs-dir={addr}={}", ca_only.path().display());
    let out = build(work.path(), &addr, "no-client", &[flag], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(&addr), "{err}");
    assert!(
        last.contains("asks for a TLS client certificate and none is configured"),
        "{err}"
    );
    assert_no_key(&err, &keys);
}

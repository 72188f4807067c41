//! HTTPS tarball contexts from a loopback HTTPS server with a CA made for the test.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kiln_context::{open_context, ContextError, ContextOptions};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Writes a CA certificate to `dir/ca.pem` and returns a TLS server config for 127.0.0.1
/// signed by it.
fn certificates(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kiln-context test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf_params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();

    let ca_path = dir.join("ca.pem");
    fs::write(&ca_path, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    (ca_path, Arc::new(config))
}

/// Serves `files` (URL path → body) over HTTPS on a loopback port, one connection at a time,
/// on a background thread that lives as long as the test process. Unknown paths get 404.
fn serve(config: Arc<rustls::ServerConfig>, files: Vec<(&'static str, Vec<u8>)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(connection, stream);
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                match tls.read(&mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            let request = String::from_utf8_lossy(&request);
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let (status, body) = match files.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => ("200 OK", body.clone()),
                None => ("404 Not Found", b"not found".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(head.as_bytes());
            let _ = tls.write_all(&body);
            let _ = tls.flush();
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    port
}

fn tarball(dir: &Path, gzip: bool) -> Vec<u8> {
    let src = dir.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("Dockerfile"), "FROM scratch\n").unwrap();
    // Big enough to arrive in many chunks.
    fs::write(src.join("sub/data.bin"), vec![42u8; 4 << 20]).unwrap();
    let out = dir.join(if gzip { "ctx.tar.gz" } else { "ctx.tar" });
    let flag = if gzip { "-czf" } else { "-cf" };
    let status = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg(flag)
        .arg(&out)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    fs::read(out).unwrap()
}

#[tokio::test]
async fn https_tarballs_download_and_extract() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, config) = certificates(tmp.path());
    let gz = tarball(tmp.path(), true);
    let plain = tarball(tmp.path(), false);
    let port = serve(
        config,
        vec![("/ctx.tar.gz", gz), ("/download?name=ctx", plain)],
    );

    let mut options = ContextOptions::new(tmp.path().join("work"));
    options.source.ca_certificates = vec![ca];
    for url in [
        format!("https://127.0.0.1:{port}/ctx.tar.gz"),
        format!("https://127.0.0.1:{port}/download?name=ctx"),
    ] {
        let context = open_context(&url, &options).await.unwrap();
        assert!(context.root().join("Dockerfile").is_file(), "{url}");
        let data = fs::read(context.root().join("sub/data.bin")).unwrap();
        assert_eq!(data.len(), 4 << 20);
        assert!(data.iter().all(|b| *b == 42));
    }

    options.sub_path = Some("sub".into());
    let context = open_context(&format!("https://127.0.0.1:{port}/ctx.tar.gz"), &options)
        .await
        .unwrap();
    assert!(context.root().join("data.bin").is_file());
}

#[tokio::test]
async fn https_failures_name_url_and_status_without_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, config) = certificates(tmp.path());
    let port = serve(
        config,
        vec![("/junk.tar", b"this is not a tar archive at all".repeat(40))],
    );

    let mut options = ContextOptions::new(tmp.path().join("work"));
    options.source.ca_certificates = vec![ca.clone()];
    let url = format!("https://alice:hunter22@127.0.0.1:{port}/missing.tar.gz");
    let err = open_context(&url, &options).await.unwrap_err();
    assert!(
        matches!(err, ContextError::HttpStatus { status: 404, .. }),
        "{err}"
    );
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains(&format!("127.0.0.1:{port}/missing.tar.gz")),
        "{shown}"
    );
    assert!(shown.contains("404"), "{shown}");
    assert!(
        !shown.contains("hunter22") && !shown.contains("alice"),
        "{shown}"
    );

    // A corrupt archive is an archive error, not a silent empty context.
    let err = open_context(&format!("https://127.0.0.1:{port}/junk.tar"), &options)
        .await
        .unwrap_err();
    assert!(matches!(err, ContextError::Archive { .. }), "{err}");

    // Without the test CA the server is not trusted.
    let untrusted = ContextOptions::new(tmp.path().join("work"));
    let err = open_context(&format!("https://127.0.0.1:{port}/junk.tar"), &untrusted)
        .await
        .unwrap_err();
    assert!(matches!(err, ContextError::Http { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    // A CA file that isn't PEM is reported with its path.
    let bogus = tmp.path().join("bogus.pem");
    fs::write(&bogus, "not a certificate").unwrap();
    let mut bad_ca = ContextOptions::new(tmp.path().join("work"));
    bad_ca.source.ca_certificates = vec![bogus];
    let err = open_context(&format!("https://127.0.0.1:{port}/junk.tar"), &bad_ca)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bogus.pem"), "{err}");
}

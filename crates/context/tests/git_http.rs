//! Git contexts over smart HTTP: a real `git http-backend` (CGI) behind a tiny loopback HTTP
//! server that demands Basic credentials, so credentials embedded in the context URL are
//! exercised end to end and checked to stay out of error messages; and the same server behind
//! TLS with a CA made for the test, for the certificate options.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use kiln_context::{open_context, ContextError, ContextOptions};
use kiln_testkit::git::git;

/// "kiln:s3cret-pass" in Basic form.
const EXPECTED_AUTH: &str = "Basic a2lsbjpzM2NyZXQtcGFzcw==";

/// Handles one HTTP/1.1 request by running `git http-backend` as a CGI program.
fn handle(stream: impl Read + Write, project_root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("GET").to_owned();
    let target = parts.next().unwrap_or("/").to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if header("authorization").as_deref() != Some(EXPECTED_AUTH) {
        reader.get_mut().write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let mut body = Vec::new();
    if let Some(length) = header("content-length") {
        body.resize(length.parse().unwrap_or(0), 0);
        reader.read_exact(&mut body)?;
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cgi = Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", project_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("GIT_PROTOCOL", header("git-protocol").unwrap_or_default())
        .env("REMOTE_USER", "kiln")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    cgi.stdin.take().unwrap().write_all(&body)?;
    let mut response = Vec::new();
    cgi.stdout.take().unwrap().read_to_end(&mut response)?;
    cgi.wait()?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| {
            response
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, 2))
        })
        .unwrap_or((response.len(), 0));
    let cgi_headers = String::from_utf8_lossy(&response[..split.0]).into_owned();
    let cgi_body = &response[split.0 + split.1..];
    let mut status = "200 OK".to_owned();
    let mut head = String::new();
    for line in cgi_headers.lines() {
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => {
                status = value.trim().to_owned()
            }
            Some(_) => {
                head.push_str(line);
                head.push_str("\r\n");
            }
            None => {}
        }
    }
    let out = reader.get_mut();
    write!(
        out,
        "HTTP/1.1 {status}\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
        cgi_body.len()
    )?;
    out.write_all(cgi_body)?;
    out.flush()
}

/// Serves the repositories below `project_root` on a loopback port, over TLS with `tls`.
fn serve(project_root: PathBuf, tls: Option<Arc<rustls::ServerConfig>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let root = project_root.clone();
            let tls = tls.clone();
            std::thread::spawn(move || {
                let _ = match tls {
                    None => handle(stream, &root),
                    Some(config) => rustls::ServerConnection::new(config)
                        .map_err(std::io::Error::other)
                        .and_then(|connection| {
                            let mut stream = rustls::StreamOwned::new(connection, stream);
                            handle(&mut stream, &root)?;
                            stream.conn.send_close_notify();
                            stream.flush()
                        }),
                };
            });
        }
    });
    port
}

/// Writes a CA certificate to `dir/ca.pem` and returns a TLS server configuration for
/// 127.0.0.1 signed by it.
fn certificates(dir: &Path) -> (PathBuf, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kiln git test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let ca_path = dir.join("ca.pem");
    fs::write(&ca_path, ca.pem()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
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

/// A bare `app.git` below `dir/served` with `hello.txt` at tag `v2`; returns `dir/served`.
fn served_repository(dir: &Path) -> PathBuf {
    let work_repo = dir.join("repo");
    fs::create_dir(&work_repo).unwrap();
    git(&work_repo, &["init", "-q"]);
    fs::write(work_repo.join("hello.txt"), "over http\n").unwrap();
    git(&work_repo, &["add", "."]);
    git(&work_repo, &["commit", "-q", "-m", "one"]);
    git(&work_repo, &["tag", "v2"]);
    let served = dir.join("served");
    fs::create_dir(&served).unwrap();
    git(dir, &["clone", "-q", "--bare", "repo", "served/app.git"]);
    served
}

#[tokio::test]
async fn git_over_smart_http_with_credentials_in_the_url() {
    let tmp = tempfile::tempdir().unwrap();
    let port = serve(served_repository(tmp.path()), None);
    let options = ContextOptions::new(tmp.path().join("work"));

    let url = format!("http://kiln:s3cret-pass@127.0.0.1:{port}/app.git#v2");
    let context = open_context(&url, &options).await.unwrap();
    assert_eq!(
        fs::read_to_string(context.root().join("hello.txt")).unwrap(),
        "over http\n"
    );
    assert!(!context.description().contains("s3cret"));

    // Wrong password: the clone fails, the message names the URL without secrets.
    let url = format!("http://kiln:wrong-pass-123@127.0.0.1:{port}/app.git");
    let err = open_context(&url, &options).await.unwrap_err();
    assert!(matches!(err, ContextError::Git { .. }), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains(&format!("127.0.0.1:{port}/app.git")),
        "{shown}"
    );
    assert!(!shown.contains("wrong-pass-123"), "{shown}");
}

/// HTTPS git trusts the system's CAs and the ones given (`ca_certificates`); a server whose
/// certificate nothing vouches for is refused unless told to skip verification (kaniko's
/// `--git insecure-skip-tls=true`). Credentials in the URL travel over TLS as over HTTP.
#[tokio::test]
async fn git_over_https_trusts_the_certificates_given() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, tls) = certificates(tmp.path());
    let port = serve(served_repository(tmp.path()), Some(tls));
    let url = format!("https://kiln:s3cret-pass@127.0.0.1:{port}/app.git#v2");

    let mut options = ContextOptions::new(tmp.path().join("work"));
    let err = open_context(&url, &options).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(matches!(err, ContextError::Git { .. }), "{err}");
    assert!(shown.contains("certificate"), "{shown}");
    assert!(!shown.contains("s3cret-pass"), "{shown}");

    options.source.ca_certificates = vec![ca];
    let context = open_context(&url, &options).await.unwrap();
    assert_eq!(
        fs::read_to_string(context.root().join("hello.txt")).unwrap(),
        "over http\n"
    );

    let mut options = ContextOptions::new(tmp.path().join("work"));
    options.source.git.apply("insecure-skip-tls=true").unwrap();
    let context = open_context(&url, &options).await.unwrap();
    assert!(context.root().join("hello.txt").is_file());

    // A CA file that is not one is named before anything is fetched.
    let mut options = ContextOptions::new(tmp.path().join("work"));
    let bogus = tmp.path().join("bogus.pem");
    fs::write(&bogus, "not a certificate").unwrap();
    options.source.ca_certificates = vec![bogus];
    let err = open_context(&url, &options).await.unwrap_err().to_string();
    assert!(err.contains("bogus.pem"), "{err}");
}

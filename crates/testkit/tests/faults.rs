//! The fault proxy against the real `docker-registry`: untouched traffic (a skopeo round trip,
//! a 100 MB blob) passes, and each fault reaches a plain `std::net` client exactly as named.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_testkit::faults::{Direction, Fault, FaultProxy, Rule, Seen};
use kiln_testkit::{bases, require_tools, run, Registry};
use sha2::{Digest, Sha256};

/// One HTTP/1.1 answer as a client saw it.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive client connection speaking just enough HTTP/1.1 for these tests.
struct Client {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Client {
    fn connect(addr: &str) -> Client {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            reader: BufReader::new(stream),
            host: addr.to_owned(),
        }
    }

    fn timeout(&self, timeout: Duration) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .unwrap();
    }

    fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let framed = headers.iter().any(|(name, _)| {
            name.eq_ignore_ascii_case("content-length")
                || name.eq_ignore_ascii_case("transfer-encoding")
        });
        if !framed && (!body.is_empty() || matches!(method, "PUT" | "POST" | "PATCH")) {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)
    }

    /// Reads an answer's status line and headers.
    fn head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no answer"));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                return Ok((status, headers));
            }
            let (name, value) = line.split_once(':').expect("header line");
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }

    /// Reads a whole answer (the body by `Content-Length`, none for HEAD).
    fn answer(&mut self, method: &str) -> io::Result<Answer> {
        let (status, headers) = self.head()?;
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if method != "HEAD" {
            let length: usize = answer
                .header("content-length")
                .map_or(0, |l| l.parse().unwrap());
            answer.body = vec![0; length];
            self.reader.read_exact(&mut answer.body)?;
        }
        Ok(answer)
    }

    fn call(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        self.send(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: send: {e}"));
        self.answer(method)
            .unwrap_or_else(|e| panic!("{method} {path}: answer: {e}"))
    }

    /// Reads the rest of a body until the connection ends, returning what came and how it
    /// ended.
    fn read_to_end(&mut self) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let mut buf = [0; 8192];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
    }
}

fn call(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    Client::connect(addr).call(method, path, headers, body)
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The path of an upload `Location`, which the registry makes absolute; asserts it names
/// `addr` so a client following it comes back the same way.
fn location_path(answer: &Answer, addr: &str) -> String {
    let location = answer.header("location").expect("upload Location");
    let rest = location
        .strip_prefix(&format!("http://{addr}"))
        .unwrap_or_else(|| panic!("Location {location} does not name {addr}"));
    rest.to_owned()
}

/// Starts a blob upload at `addr` and returns the path to PUT its body to, digest appended.
fn start_upload(addr: &str, repo: &str, digest: &str) -> String {
    let started = call(
        addr,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        b"",
    );
    assert_eq!(started.status, 202, "start an upload at {addr}");
    let path = location_path(&started, addr);
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}digest={digest}")
}

/// Pushes a blob in one PUT; returns its digest.
fn push_blob(addr: &str, repo: &str, data: &[u8]) -> String {
    let digest = digest(data);
    let path = start_upload(addr, repo, &digest);
    let answer = call(addr, "PUT", &path, &[], data);
    assert_eq!(
        answer.status,
        201,
        "push blob {digest} to {addr}: {:?}",
        String::from_utf8_lossy(&answer.body)
    );
    digest
}

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Pushes a one-layer image as `repo:tag`; returns the manifest bytes.
fn push_image(addr: &str, repo: &str, tag: &str, layer: &[u8]) -> Vec<u8> {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(addr, repo, config);
    let layer_digest = push_blob(addr, repo, layer);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let answer = call(
        addr,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Content-Type", MANIFEST_TYPE)],
        &manifest,
    );
    assert_eq!(
        answer.status,
        201,
        "push manifest: {}",
        String::from_utf8_lossy(&answer.body)
    );
    manifest
}

/// Deterministic bytes that do not compress into a pattern a bug could hide behind.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn statuses(seen: &[Seen]) -> Vec<Option<u16>> {
    seen.iter().map(|s| s.status).collect()
}

fn faults(seen: &[Seen]) -> Vec<Option<&str>> {
    seen.iter().map(|s| s.fault.as_deref()).collect()
}

/// Waits up to `limit` for the proxy's connections to be gone: a hold has ended.
fn wait_closed(proxy: &FaultProxy, limit: Duration) -> Duration {
    let start = Instant::now();
    while proxy.open_connections() > 0 {
        assert!(
            start.elapsed() < limit,
            "the proxy still holds {} connection(s) after {limit:?}",
            proxy.open_connections()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[test]
fn without_rules_skopeo_copies_an_image_through_and_back() {
    require_tools(&["skopeo"]);
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr(), vec![]);
    let digest_file = tempfile::NamedTempFile::new().unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
        .arg(digest_file.path())
        .arg(format!("oci:{}:latest", bases::busybox_layout().display()))
        .arg(format!("docker://{}/fp/busybox:1", proxy.addr())));
    let pushed = std::fs::read_to_string(digest_file.path()).unwrap();
    let back = tempfile::tempdir().unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{}/fp/busybox:1", proxy.addr()))
        .arg(format!("oci:{}:back", back.path().display())));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(back.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], pushed.trim());

    let seen = proxy.seen();
    assert_eq!(proxy.faults_given(), 0);
    assert!(
        seen.iter().all(|s| s.fault.is_none() && s.status.is_some()),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.method == "PUT" && s.path.contains("/blobs/uploads/")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.method == "GET" && s.path.contains("/blobs/sha256:")),
        "{seen:?}"
    );
    // Every request reached the registry, once.
    assert_eq!(registry.requests().len(), seen.len(), "{seen:?}");
}

/// Reads `/proc/self/status`'s peak resident size in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_100_mb_blob_streams_through_in_bounded_memory() {
    const SIZE: usize = 100 << 20;
    const BLOCK: usize = 1 << 20;
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr(), vec![]);
    // The content is a block of noise repeated, so neither side of the test holds 100 MB.
    let block = noise(BLOCK, 7);
    let mut hasher = Sha256::new();
    for _ in 0..SIZE / BLOCK {
        hasher.update(&block);
    }
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    let before = peak_rss_kib();

    let path = start_upload(&proxy.addr(), "fp/big", &digest);
    let mut client = Client::connect(&proxy.addr());
    client
        .send("PUT", &path, &[("Content-Length", &SIZE.to_string())], b"")
        .unwrap();
    for _ in 0..SIZE / BLOCK {
        client.reader.get_mut().write_all(&block).unwrap();
    }
    let put = client.answer("PUT").unwrap();
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));

    client
        .send("GET", &format!("/v2/fp/big/blobs/{digest}"), &[], b"")
        .unwrap();
    let (status, headers) = client.head().unwrap();
    assert_eq!(status, 200);
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap();
    assert_eq!(length, SIZE);
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 256 << 10];
    let mut left = length;
    while left > 0 {
        let n = client.reader.read(&mut buf[..left.min(256 << 10)]).unwrap();
        assert!(n > 0, "blob cut with {left} bytes left");
        hasher.update(&buf[..n]);
        left -= n;
    }
    assert_eq!(format!("sha256:{}", hex::encode(hasher.finalize())), digest);
    let grown_mib = (peak_rss_kib() - before) / 1024;
    eprintln!("peak resident size grew {grown_mib} MiB for a 100 MiB blob up and down");
    assert!(grown_mib < 32, "peak resident size grew {grown_mib} MiB");
}

#[test]
fn status_fault_answers_the_code_with_an_oci_error_and_retry_after() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![
            Rule::new(
                Some("GET"),
                "/tags/list",
                Fault::Status {
                    code: 503,
                    retry_after: Some(7),
                },
            ),
            Rule::new(
                Some("HEAD"),
                "/manifests/",
                Fault::Status {
                    code: 429,
                    retry_after: None,
                },
            ),
        ],
    );
    let mut client = Client::connect(&proxy.addr());
    let answer = client.call("GET", "/v2/fp/x/tags/list", &[], b"");
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("7"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"errors": [{"code": "UNAVAILABLE", "message": "fault proxy: status 503"}]})
    );
    let head = client.call("HEAD", "/v2/fp/x/manifests/1", &[], b"");
    assert_eq!(head.status, 429);
    assert_eq!(head.header("retry-after"), None);
    // The connection stays usable, and what no rule matches is the registry's own answer.
    let ping = client.call("GET", "/v2/", &[], b"");
    assert_eq!(ping.status, 200);
    assert_eq!(
        ping.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    let seen = proxy.seen();
    assert_eq!(statuses(&seen), [Some(503), Some(429), Some(200)]);
    assert_eq!(faults(&seen), [Some("Status"), Some("Status"), None]);
    assert_eq!(proxy.faults_given(), 2);
}

#[test]
fn reset_before_headers_resets_without_an_answer() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![Rule::new(Some("GET"), "/v2/", Fault::ResetBeforeHeaders)],
    );
    let mut client = Client::connect(&proxy.addr());
    client.send("GET", "/v2/", &[], b"").unwrap();
    let (got, end) = client.read_to_end();
    assert!(got.is_empty(), "got {} bytes", got.len());
    let error = end.expect_err("the connection ended cleanly, not with a reset");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    assert_eq!(statuses(&proxy.seen()), [None]);
    assert_eq!(faults(&proxy.seen()), [Some("ResetBeforeHeaders")]);
    assert_eq!(proxy.faults_given(), 1);
}

#[test]
fn reset_mid_body_cuts_a_blob_download_and_an_upload() {
    let registry = Registry::start();
    let blob = noise(200_000, 1);
    let digest = push_blob(&registry.addr(), "fp/x", &blob);
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![
            Rule::new(Some("GET"), "/blobs/sha256:", Fault::ResetMidBody),
            Rule::new(Some("PUT"), "/blobs/uploads/", Fault::ResetMidBody),
        ],
    );
    let mut client = Client::connect(&proxy.addr());
    client
        .send("GET", &format!("/v2/fp/x/blobs/{digest}"), &[], b"")
        .unwrap();
    let (status, headers) = client.head().unwrap();
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("Content-Length".to_owned(), "200000".to_owned())),
        "{headers:?}"
    );
    let (got, end) = client.read_to_end();
    let error = end.expect_err("the body ended cleanly, not with a reset");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    assert!(got.len() <= 100_000, "got {} of 200000 bytes", got.len());
    assert_eq!(got[..], blob[..got.len()]);

    let upload = noise(200_000, 2);
    let path = start_upload(&proxy.addr(), "fp/x", &digest_of(&upload));
    let mut client = Client::connect(&proxy.addr());
    let sent = client.send("PUT", &path, &[], &upload);
    let answer = client.head();
    let error = sent
        .err()
        .or(answer.err())
        .expect("the upload was answered");
    assert!(is_reset(&error), "{error}");
    let check = call(
        &registry.addr(),
        "HEAD",
        &format!("/v2/fp/x/blobs/{}", digest_of(&upload)),
        &[],
        b"",
    );
    assert_eq!(check.status, 404, "the cut upload was stored");
    let seen = proxy.seen();
    assert_eq!(statuses(&seen), [Some(200), Some(202), None]);
    assert_eq!(
        faults(&seen),
        [Some("ResetMidBody"), None, Some("ResetMidBody")]
    );
}

fn digest_of(data: &[u8]) -> String {
    digest(data)
}

#[test]
fn short_body_sends_half_a_download_and_cuts_an_upload() {
    let registry = Registry::start();
    let blob = noise(200_000, 3);
    let digest = push_blob(&registry.addr(), "fp/x", &blob);
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![
            Rule::new(Some("GET"), "/blobs/sha256:", Fault::ShortBody),
            Rule::new(Some("PUT"), "/blobs/uploads/", Fault::ShortBody),
        ],
    );
    let mut client = Client::connect(&proxy.addr());
    client
        .send("GET", &format!("/v2/fp/x/blobs/{digest}"), &[], b"")
        .unwrap();
    let (status, headers) = client.head().unwrap();
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("Content-Length".to_owned(), "200000".to_owned())),
        "{headers:?}"
    );
    let (got, end) = client.read_to_end();
    end.expect("a short body ends with a clean close");
    assert_eq!(got.len(), 100_000);
    assert_eq!(got[..], blob[..100_000]);

    let upload = noise(200_000, 4);
    let path = start_upload(&proxy.addr(), "fp/x", &digest_of(&upload));
    let mut client = Client::connect(&proxy.addr());
    client.send("PUT", &path, &[], &upload).unwrap();
    // The registry saw half a body and the end of the stream: whatever it says, it is no 201.
    let answer = client.answer("PUT");
    if let Ok(answer) = &answer {
        assert!(answer.status >= 400, "the cut upload got {}", answer.status);
    }
    eprintln!(
        "the registry's answer to a cut upload: {:?}",
        answer
            .as_ref()
            .map(|a| (a.status, String::from_utf8_lossy(&a.body).into_owned()))
    );
    let check = call(
        &registry.addr(),
        "HEAD",
        &format!("/v2/fp/x/blobs/{}", digest_of(&upload)),
        &[],
        b"",
    );
    assert_eq!(check.status, 404, "the cut upload was stored");
    assert_eq!(
        faults(&proxy.seen()),
        [Some("ShortBody"), None, Some("ShortBody")]
    );
}

#[test]
fn trickle_paces_a_download_and_an_upload() {
    const RATE: usize = 20_000;
    let registry = Registry::start();
    let blob = noise(30_000, 5);
    let digest = push_blob(&registry.addr(), "fp/x", &blob);
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![
            Rule::new(
                Some("GET"),
                "/blobs/sha256:",
                Fault::Trickle {
                    bytes_per_second: RATE,
                    direction: Direction::Answer,
                },
            ),
            Rule::new(
                Some("PUT"),
                "/blobs/uploads/",
                Fault::Trickle {
                    bytes_per_second: RATE,
                    direction: Direction::Upload,
                },
            ),
        ],
    );
    let start = Instant::now();
    let answer = call(
        &proxy.addr(),
        "GET",
        &format!("/v2/fp/x/blobs/{digest}"),
        &[],
        b"",
    );
    let down = start.elapsed();
    assert_eq!(answer.status, 200);
    assert!(answer.body == blob, "the trickled body differs");

    let upload = noise(30_000, 6);
    let path = start_upload(&proxy.addr(), "fp/x", &digest_of(&upload));
    let start = Instant::now();
    let answer = call(&proxy.addr(), "PUT", &path, &[], &upload);
    let up = start.elapsed();
    assert_eq!(answer.status, 201);
    let stored = call(
        &registry.addr(),
        "GET",
        &format!("/v2/fp/x/blobs/{}", digest_of(&upload)),
        &[],
        b"",
    );
    assert!(
        stored.body == upload,
        "the trickled upload was stored changed"
    );

    for (what, took) in [("download", down), ("upload", up)] {
        let rate = 30_000.0 / took.as_secs_f64();
        eprintln!("{what}: 30000 bytes in {took:?}, {rate:.0} B/s at {RATE} B/s asked");
        assert!(
            (0.7..1.3).contains(&(rate / RATE as f64)),
            "{what} went at {rate:.0} B/s"
        );
    }
}

#[test]
fn stall_after_headers_holds_until_the_client_gives_up() {
    let registry = Registry::start();
    let blob = noise(50_000, 7);
    let digest = push_blob(&registry.addr(), "fp/x", &blob);
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![
            Rule::new(Some("GET"), "/blobs/sha256:", Fault::StallAfterHeaders),
            Rule::new(Some("PUT"), "/blobs/uploads/", Fault::StallAfterHeaders),
        ],
    );
    let mut client = Client::connect(&proxy.addr());
    client
        .send("GET", &format!("/v2/fp/x/blobs/{digest}"), &[], b"")
        .unwrap();
    let (status, _) = client.head().unwrap();
    assert_eq!(status, 200);
    client.timeout(Duration::from_millis(800));
    let start = Instant::now();
    let mut byte = [0];
    let error = client.reader.read(&mut byte).expect_err("a body byte came");
    assert!(is_timeout(&error), "{error}");
    assert!(start.elapsed() >= Duration::from_millis(700));
    drop(client);
    let ended = wait_closed(&proxy, Duration::from_secs(2));
    eprintln!("the answer stall ended {ended:?} after its client closed");

    let path = start_upload(&proxy.addr(), "fp/x", &digest_of(b"stalled"));
    let mut client = Client::connect(&proxy.addr());
    client.send("PUT", &path, &[], &noise(20_000, 8)).unwrap();
    client.timeout(Duration::from_millis(800));
    let error = client.head().expect_err("the stalled upload was answered");
    assert!(is_timeout(&error), "{error}");
    drop(client);
    wait_closed(&proxy, Duration::from_secs(2));
    let seen = proxy.seen();
    assert_eq!(statuses(&seen), [Some(200), Some(202), None]);
    assert_eq!(
        faults(&seen),
        [Some("StallAfterHeaders"), None, Some("StallAfterHeaders")]
    );
}

#[test]
fn never_answer_holds_and_the_proxy_drops_promptly() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![Rule::new(None, "/v2/", Fault::NeverAnswer)],
    );
    let mut client = Client::connect(&proxy.addr());
    client.send("GET", "/v2/", &[], b"").unwrap();
    client.timeout(Duration::from_millis(800));
    let mut byte = [0];
    let error = client
        .reader
        .read(&mut byte)
        .expect_err("an answer byte came");
    assert!(is_timeout(&error), "{error}");
    assert_eq!(proxy.open_connections(), 1);
    assert_eq!(statuses(&proxy.seen()), [None]);
    assert_eq!(faults(&proxy.seen()), [Some("NeverAnswer")]);
    // Dropping the proxy ends the hold at once instead of waiting out its 120 s.
    let start = Instant::now();
    drop(proxy);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "drop took {took:?}");
    client.timeout(Duration::from_secs(2));
    let (got, _) = client.read_to_end();
    assert!(got.is_empty());
}

#[test]
fn corrupt_body_changes_the_digest_both_ways() {
    let registry = Registry::start();
    let layer = noise(10_001, 9);
    let manifest = push_image(&registry.addr(), "fp/x", "1", &layer);
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![
            Rule::new(
                Some("GET"),
                "/manifests/",
                Fault::CorruptBody {
                    direction: Direction::Answer,
                },
            ),
            Rule::new(
                Some("GET"),
                "/blobs/",
                Fault::CorruptBody {
                    direction: Direction::Answer,
                },
            ),
            Rule::new(
                Some("PUT"),
                "/",
                Fault::CorruptBody {
                    direction: Direction::Upload,
                },
            ),
        ],
    );
    let addr = proxy.addr();
    let pulled = call(
        &addr,
        "GET",
        "/v2/fp/x/manifests/1",
        &[("Accept", MANIFEST_TYPE)],
        b"",
    );
    assert_eq!(pulled.status, 200);
    assert_eq!(
        pulled.header("docker-content-digest"),
        Some(digest(&manifest).as_str())
    );
    assert_eq!(pulled.body.len(), manifest.len() + 1);
    assert_ne!(digest(&pulled.body), digest(&manifest));
    let as_json: serde_json::Value = serde_json::from_slice(&pulled.body).unwrap();
    assert_eq!(
        as_json,
        serde_json::from_slice::<serde_json::Value>(&manifest).unwrap()
    );

    let pulled = call(
        &addr,
        "GET",
        &format!("/v2/fp/x/blobs/{}", digest(&layer)),
        &[],
        b"",
    );
    assert_eq!(pulled.status, 200);
    assert_eq!(pulled.body.len(), layer.len());
    let differing: Vec<usize> = (0..layer.len())
        .filter(|&i| pulled.body[i] != layer[i])
        .collect();
    assert_eq!(differing, [layer.len() / 2]);
    assert_ne!(digest(&pulled.body), digest(&layer));

    // A blob upload whose bytes changed on the way fails the registry's digest check.
    let upload = noise(5_000, 10);
    let path = start_upload(&addr, "fp/x", &digest(&upload));
    let refused = call(&addr, "PUT", &path, &[], &upload);
    assert_eq!(
        refused.status,
        400,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(String::from_utf8_lossy(&refused.body).contains("DIGEST_INVALID"));
    // A manifest pushed by tag is stored under the digest of the changed bytes.
    let pushed = call(
        &addr,
        "PUT",
        "/v2/fp/x/manifests/2",
        &[("Content-Type", MANIFEST_TYPE)],
        &manifest,
    );
    assert_eq!(
        pushed.status,
        201,
        "{}",
        String::from_utf8_lossy(&pushed.body)
    );
    let mut changed = manifest.clone();
    changed.insert(1, b' ');
    assert_eq!(
        pushed.header("docker-content-digest"),
        Some(digest(&changed).as_str())
    );
    assert_eq!(proxy.faults_given(), 4);
}

#[test]
fn expire_token_revokes_the_token_and_challenges_again() {
    let registry = Registry::start();
    push_image(&registry.addr(), "fp/x", "1", b"layer");
    // The unauthenticated manifest request is the first match, the first with a token the
    // second: the third gets the fault.
    let proxy = FaultProxy::start_with_token_auth(
        &registry.addr(),
        vec![Rule::new(Some("GET"), "/manifests/", Fault::ExpireToken)
            .nth(3)
            .times(1)],
    );
    let addr = proxy.addr();
    let realm = format!("Bearer realm=\"http://{addr}/token\",service=\"fault-proxy\"");
    let ping = call(&addr, "GET", "/v2/", &[], b"");
    assert_eq!(ping.status, 401);
    assert_eq!(ping.header("www-authenticate"), Some(realm.as_str()));
    let scoped = format!("{realm},scope=\"repository:fp/x:pull,push\"");
    let manifest_path = "/v2/fp/x/manifests/1";
    let accept = ("Accept", MANIFEST_TYPE);
    let anonymous = call(&addr, "GET", manifest_path, &[accept], b"");
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.header("www-authenticate"), Some(scoped.as_str()));

    let token = |client: &mut Client| {
        let issued = client.call(
            "GET",
            "/token?service=fault-proxy&scope=repository:fp/x:pull,push",
            &[],
            b"",
        );
        assert_eq!(issued.status, 200);
        let json: serde_json::Value = serde_json::from_slice(&issued.body).unwrap();
        assert_eq!(json["token"], json["access_token"]);
        assert_eq!(json["expires_in"], 300);
        format!("Bearer {}", json["token"].as_str().unwrap())
    };
    let mut client = Client::connect(&addr);
    let first = token(&mut client);
    let ok = client.call(
        "GET",
        manifest_path,
        &[accept, ("Authorization", &first)],
        b"",
    );
    assert_eq!(ok.status, 200);
    let expired = client.call(
        "GET",
        manifest_path,
        &[accept, ("Authorization", &first)],
        b"",
    );
    assert_eq!(expired.status, 401);
    assert_eq!(expired.header("www-authenticate"), Some(scoped.as_str()));
    assert!(String::from_utf8_lossy(&expired.body).contains("UNAUTHORIZED"));
    let revoked = client.call(
        "GET",
        manifest_path,
        &[accept, ("Authorization", &first)],
        b"",
    );
    assert_eq!(revoked.status, 401, "the expired token still works");
    let second = token(&mut client);
    assert_ne!(first, second);
    let ok = client.call(
        "GET",
        manifest_path,
        &[accept, ("Authorization", &second)],
        b"",
    );
    assert_eq!(ok.status, 200);
    let seen = proxy.seen();
    assert_eq!(
        statuses(&seen),
        [
            Some(401),
            Some(401),
            Some(200),
            Some(200),
            Some(401),
            Some(401),
            Some(200),
            Some(200)
        ]
    );
    assert_eq!(proxy.faults_given(), 1);
    assert_eq!(seen[4].fault.as_deref(), Some("ExpireToken"));
}

#[test]
fn nth_and_times_pick_which_matching_requests_get_the_fault() {
    let registry = Registry::start();
    let status = |code| Fault::Status {
        code,
        retry_after: None,
    };
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![
            Rule::new(Some("get"), "/v2/", status(500)).nth(2).times(2),
            Rule::new(None, "/v2/", status(502)).nth(6),
        ],
    );
    let mut client = Client::connect(&proxy.addr());
    let got: Vec<u16> = ["GET", "GET", "HEAD", "GET", "GET", "GET", "HEAD"]
        .iter()
        .map(|method| client.call(method, "/v2/", &[], b"").status)
        .collect();
    // Rule one counts GETs only (2nd and 3rd GET); rule two counts every request (6th on).
    assert_eq!(got, [200, 500, 200, 500, 200, 502, 502]);
    assert_eq!(proxy.faults_given(), 4);
    let unmatched = client.call("GET", "/token", &[], b"");
    assert_eq!(unmatched.status, 404);
    assert_eq!(proxy.seen().len(), 8);
}

/// Writes `data` as a chunked body in pieces of the given sizes, one with a chunk extension,
/// and a trailer after the last chunk.
fn write_chunked(stream: &mut TcpStream, data: &[u8], pieces: &[usize]) {
    let mut at = 0;
    for (i, &size) in pieces.iter().enumerate() {
        let extension = if i == 1 { ";piece=two" } else { "" };
        write!(stream, "{size:x}{extension}\r\n").unwrap();
        stream.write_all(&data[at..at + size]).unwrap();
        stream.write_all(b"\r\n").unwrap();
        at += size;
    }
    assert_eq!(at, data.len());
    stream.write_all(b"0\r\nX-Trailer: end\r\n\r\n").unwrap();
}

#[test]
fn chunked_uploads_expect_continue_and_upstream_locations_pass_through() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(
        &registry.addr(),
        vec![Rule::new(
            Some("PATCH"),
            "/fp/corrupt/",
            Fault::CorruptBody {
                direction: Direction::Upload,
            },
        )],
    );
    let data = noise(31_007, 11);
    let pieces = [1_000, 7, 30_000];

    // Sent with the registry's own name as Host, the upload's Location names the registry:
    // the proxy rewrites it to itself.
    let mut client = Client::connect(&proxy.addr());
    client.host = registry.addr();
    let started = client.call("POST", "/v2/fp/plain/blobs/uploads/", &[], b"");
    assert_eq!(started.status, 202);
    let path = location_path(&started, &proxy.addr());

    // A chunked PATCH that waits for 100 Continue before its body.
    client
        .send(
            "PATCH",
            &path,
            &[("Transfer-Encoding", "chunked"), ("Expect", "100-continue")],
            b"",
        )
        .unwrap();
    let (interim, _) = client.head().unwrap();
    assert_eq!(interim, 100);
    write_chunked(client.reader.get_mut(), &data, &pieces);
    let patched = client.answer("PATCH").unwrap();
    assert_eq!(
        patched.status,
        202,
        "{}",
        String::from_utf8_lossy(&patched.body)
    );
    assert_eq!(patched.header("range"), Some("0-31006"));
    let path = location_path(&patched, &proxy.addr());
    let done = client.call("PUT", &format!("{path}&digest={}", digest(&data)), &[], b"");
    assert_eq!(done.status, 201, "{}", String::from_utf8_lossy(&done.body));
    let stored = call(
        &registry.addr(),
        "GET",
        &format!("/v2/fp/plain/blobs/{}", digest(&data)),
        &[],
        b"",
    );
    assert!(stored.body == data, "the chunked upload was stored changed");

    // A chunked body the fault changes reaches the registry changed, and fails its digest.
    let started = call(
        &proxy.addr(),
        "POST",
        "/v2/fp/corrupt/blobs/uploads/",
        &[],
        b"",
    );
    let path = location_path(&started, &proxy.addr());
    let mut client = Client::connect(&proxy.addr());
    client
        .send("PATCH", &path, &[("Transfer-Encoding", "chunked")], b"")
        .unwrap();
    write_chunked(client.reader.get_mut(), &data, &pieces);
    let patched = client.answer("PATCH").unwrap();
    assert_eq!(patched.status, 202);
    let path = location_path(&patched, &proxy.addr());
    let refused = client.call("PUT", &format!("{path}&digest={}", digest(&data)), &[], b"");
    assert_eq!(
        refused.status,
        400,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(String::from_utf8_lossy(&refused.body).contains("DIGEST_INVALID"));
    assert_eq!(proxy.faults_given(), 1);
}

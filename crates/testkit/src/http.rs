//! HTTP servers on loopback for tests: a static file server (ADD of URLs, downloads) and a
//! proxy that gives a real registry immutable tags.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Python's `http.server` handler, with the validators chosen by the test and every request
/// logged as `METHOD PATH` lines. A real server sends validators of one of these shapes; the
/// changing `ETag` stands in for content replaced between two requests, which no real server
/// does on demand.
const SERVER: &str = r#"
import hashlib, http.server, os, sys
last_modified, etag, port, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
responses = [0]
class Handler(http.server.SimpleHTTPRequestHandler):
    def send_header(self, name, value):
        if name.lower() == "last-modified" and last_modified == "no":
            return
        super().send_header(name, value)
    def end_headers(self):
        path = self.translate_path(self.path)
        if etag != "none" and os.path.isfile(path):
            responses[0] += 1
            if etag == "content":
                with open(path, "rb") as f:
                    tag = hashlib.sha256(f.read()).hexdigest()[:16]
            else:
                tag = "response-%d" % responses[0]
            super().send_header("ETag", '"%s"' % tag)
        super().end_headers()
    def log_message(self, format, *args):
        with open(log, "a") as f:
            f.write("%s %s\n" % (self.command, self.path))
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

/// The validators a [`StaticServer`] sends with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validators {
    /// `Last-Modified` from the file's mtime, as `python3 -m http.server` does.
    LastModified,
    /// A strong `ETag` derived from the content, and no `Last-Modified`.
    ContentEtag,
    /// A strong `ETag` that differs on every response, and no `Last-Modified`: the content
    /// seems to change between any two requests.
    ChangingEtag,
    /// Neither.
    None,
}

/// A Python HTTP server serving one directory on a free loopback port, stopped on drop.
pub struct StaticServer {
    child: Child,
    port: u16,
    log: tempfile::TempDir,
}

impl StaticServer {
    /// Serves `dir` with `Last-Modified`; panics if the server cannot start or does not
    /// listen within 10 s.
    pub fn start(dir: &Path) -> StaticServer {
        StaticServer::start_with(dir, Validators::LastModified)
    }

    /// Serves `dir` sending `validators`.
    pub fn start_with(dir: &Path, validators: Validators) -> StaticServer {
        crate::require_tools(&["python3"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let log = tempfile::tempdir().expect("server log directory");
        let (last_modified, etag) = match validators {
            Validators::LastModified => ("yes", "none"),
            Validators::ContentEtag => ("no", "content"),
            Validators::ChangingEtag => ("no", "changing"),
            Validators::None => ("no", "none"),
        };
        let child = Command::new("python3")
            .arg("-c")
            .arg(SERVER)
            .args([last_modified, etag, &port.to_string()])
            .arg(log.path().join("requests"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3 http.server");
        let server = StaticServer { child, port, log };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("python3 http.server did not listen on port {port}");
    }

    /// The server's base URL, `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request answered so far, as `METHOD PATH`, oldest first.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.log.path().join("requests"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy behind [`ImmutableTags`]: forwards every request to the upstream registry, except
/// a manifest PUT by tag to a tag the upstream already has, which gets Amazon ECR's answer for
/// an immutable repository. Request bodies are read whole (with `Content-Length` or chunked),
/// responses too, and `Location` headers are rewritten to point back at the proxy.
const IMMUTABLE_PROXY: &str = r#"
import http.client, http.server, json, re, sys
upstream, port = sys.argv[1], int(sys.argv[2])
me = "127.0.0.1:%d" % port
ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
MANIFEST_BY_TAG = re.compile(r"^/v2/(.+)/manifests/([A-Za-z0-9_][A-Za-z0-9._-]{0,127})$")
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))
    def upstream(self, method, path, headers, body):
        connection = http.client.HTTPConnection(upstream)
        connection.request(method, path, body=body, headers=headers)
        return connection, connection.getresponse()
    def forward(self):
        body = self.body()
        headers = {}
        for k, v in self.headers.items():
            if k.lower() not in ("host", "transfer-encoding", "connection", "content-length"):
                headers[k] = headers[k] + ", " + v if k in headers else v
        if body or self.command in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))
        tagged = MANIFEST_BY_TAG.match(self.path.split("?")[0])
        if self.command == "PUT" and tagged:
            check, existing = self.upstream("HEAD", self.path, {"Accept": ACCEPT}, None)
            existing.read()
            check.close()
            if existing.status == 200:
                repo, tag = tagged.groups()
                message = ("The image tag '%s' already exists in the '%s' repository and "
                           "cannot be overwritten because the repository is immutable." % (tag, repo))
                payload = json.dumps({"errors": [{"code": "TAG_INVALID", "message": message}]}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
        connection, response = self.upstream(self.command, self.path, headers, body)
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in ("transfer-encoding", "connection", "content-length", "date", "server"):
                continue
            if lower == "location":
                value = value.replace(upstream, me)
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else response.getheader("Content-Length", "0")))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        connection.close()
    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = forward
    def log_message(self, format, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

/// A registry whose tags are immutable, as in an Amazon ECR repository with tag immutability:
/// a plain-HTTP proxy on a free loopback port in front of a real registry that refuses, with
/// ECR's status and message, to move a tag that exists. No registry that runs here can be
/// configured that way, so this one fault is made by hand; everything else is the real
/// registry's answer. Stopped on drop.
pub struct ImmutableTags {
    child: Child,
    port: u16,
}

impl ImmutableTags {
    /// A proxy in front of the registry at `upstream` (`HOST:PORT`, plain HTTP); panics if it
    /// does not listen within 10 s.
    pub fn start(upstream: &str) -> ImmutableTags {
        crate::require_tools(&["python3"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let child = Command::new("python3")
            .arg("-c")
            .arg(IMMUTABLE_PROXY)
            .args([upstream, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the python3 proxy");
        let proxy = ImmutableTags { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the immutable-tags proxy did not listen on port {port}");
    }

    /// The proxy's address, `127.0.0.1:PORT`, to use as a registry.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for ImmutableTags {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A static HTTP server on loopback, for ADD of URLs and other downloads in tests.

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

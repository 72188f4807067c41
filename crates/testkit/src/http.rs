//! A static HTTP server on loopback, for ADD of URLs and other downloads in tests.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `python3 -m http.server` serving one directory on a free loopback port, stopped on drop.
pub struct StaticServer {
    child: Child,
    port: u16,
}

impl StaticServer {
    /// Serves `dir`; panics if the server cannot start or does not listen within 10 s.
    pub fn start(dir: &Path) -> StaticServer {
        crate::require_tools(&["python3"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3 -m http.server");
        let server = StaticServer { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("python3 -m http.server did not listen on port {port}");
    }

    /// The server's base URL, `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

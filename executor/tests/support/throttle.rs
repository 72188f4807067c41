//! A TCP proxy on loopback that slows one direction of every connection down, so a test can
//! catch a build in the middle of a pull (registry to client) or a push (client to registry).
//! The real registry stays behind it, answering every request itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The proxy: each connection is forwarded both ways; bytes in the slow direction go in
/// 1 KiB pieces at `rate` bytes per second unless the file `STATE.fast` exists, and their
/// running total is written to `STATE`.
const PROXY: &str = r#"
import os, socket, sys, threading, time
host, upstream, port, direction, rate, state = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
lock = threading.Lock()
total = [0]
def pump(src, dst, slow):
    try:
        while True:
            data = src.recv(16384)
            if not data:
                break
            if slow and not os.path.exists(state + ".fast"):
                for i in range(0, len(data), 1024):
                    dst.sendall(data[i:i + 1024])
                    time.sleep(1024.0 / rate)
            else:
                dst.sendall(data)
            if slow:
                with lock:
                    total[0] += len(data)
                    with open(state + ".tmp", "w") as f:
                        f.write(str(total[0]))
                    os.replace(state + ".tmp", state)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
while True:
    client, _ = listener.accept()
    try:
        server = socket.create_connection((host, upstream))
    except OSError:
        client.close()
        continue
    threading.Thread(target=pump, args=(client, server, direction == "up"), daemon=True).start()
    threading.Thread(target=pump, args=(server, client, direction == "down"), daemon=True).start()
"#;

/// Which way the proxy is slow.
#[derive(Debug, Clone, Copy)]
pub enum Slow {
    /// Registry to client: pulls.
    Down,
    /// Client to registry: pushes.
    Up,
}

/// A running throttling proxy, stopped on drop.
pub struct Throttle {
    child: Child,
    port: u16,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Throttle {
    /// A proxy in front of `upstream` (`127.0.0.1:PORT`) slowing `slow` to `rate` bytes/s.
    pub fn start(upstream: &str, slow: Slow, rate: u32) -> Throttle {
        kiln_testkit::require_tools(&["python3"]);
        let (host, upstream_port) = upstream.rsplit_once(':').expect("HOST:PORT");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("forwarded");
        let child = Command::new("python3")
            .arg("-c")
            .arg(PROXY)
            .args([host, upstream_port, &port.to_string()])
            .arg(match slow {
                Slow::Down => "down",
                Slow::Up => "up",
            })
            .arg(rate.to_string())
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the python3 proxy");
        let proxy = Throttle {
            child,
            port,
            state,
            _dir: dir,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the throttling proxy did not listen on port {port}");
    }

    /// The proxy's address, to use as a registry.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes forwarded in the slow direction so far.
    pub fn forwarded(&self) -> u64 {
        std::fs::read_to_string(&self.state)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Stops slowing anything down (for a rerun).
    pub fn full_speed(&self) {
        let mut fast = self.state.clone().into_os_string();
        fast.push(".fast");
        std::fs::write(Path::new(&fast), b"").unwrap();
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

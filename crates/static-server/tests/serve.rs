//! The server binary on a loopback port, asked over real TCP connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &std::path::Path) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln-static-server"))
        .arg(dir)
        .env("PORT", port.to_string())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, port }
}

/// Sends raw `requests` on one connection and reads until the server closes it.
fn exchange(port: u16, requests: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(requests.as_bytes()).unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

fn get(port: u16, path: &str) -> String {
    exchange(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

fn site() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("site/docs")).unwrap();
    std::fs::write(root.join("site/index.html"), "<h1>home</h1>").unwrap();
    std::fs::write(root.join("site/style.css"), "h1{}").unwrap();
    std::fs::write(root.join("site/docs/index.html"), "docs").unwrap();
    std::fs::write(root.join("site/404.html"), "gone").unwrap();
    std::fs::write(root.join("secret.txt"), "outside").unwrap();
    dir
}

#[test]
fn serves_files_with_their_types_and_index_pages() {
    let dir = site();
    let server = start(&dir.path().join("site"));
    let home = get(server.port, "/");
    assert!(home.starts_with("HTTP/1.1 200 OK\r\n"), "{home}");
    assert!(
        home.contains("Content-Type: text/html; charset=utf-8\r\n"),
        "{home}"
    );
    assert!(home.contains("Content-Length: 13\r\n"), "{home}");
    assert!(home.ends_with("<h1>home</h1>"), "{home}");
    let css = get(server.port, "/style.css?v=2");
    assert!(css.contains("Content-Type: text/css"), "{css}");
    assert!(css.ends_with("h1{}"), "{css}");
    let docs = get(server.port, "/docs");
    assert!(docs.starts_with("HTTP/1.1 301"), "{docs}");
    assert!(docs.contains("Location: /docs/\r\n"), "{docs}");
    assert!(get(server.port, "/docs/").ends_with("docs"));
    let missing = get(server.port, "/nope.html");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(missing.ends_with("gone"), "the site's 404 page: {missing}");
}

#[test]
fn keeps_connections_alive_and_refuses_what_it_should() {
    let dir = site();
    let server = start(&dir.path().join("site"));
    // Two requests on one connection, the second closing it; HEAD sends no body.
    let both = exchange(
        server.port,
        "HEAD /style.css HTTP/1.1\r\nHost: x\r\n\r\nGET /style.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(both.matches("HTTP/1.1 200 OK").count(), 2, "{both}");
    assert_eq!(both.matches("h1{}").count(), 1, "{both}");
    for escape in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/docs/..%2f..%2fsecret.txt",
    ] {
        let out = get(server.port, escape);
        assert!(!out.contains("outside"), "{escape}: {out}");
        assert!(out.starts_with("HTTP/1.1 400"), "{escape}: {out}");
    }
    let post = exchange(
        server.port,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(post.contains("Allow: GET, HEAD"), "{post}");
}

#[test]
fn a_bad_port_is_refused() {
    let dir = site();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-static-server"))
        .arg(dir.path())
        .env("PORT", "eighty")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("eighty"));
}

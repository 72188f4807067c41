//! A static file server for one directory: what Kiln's `static` buildpack runs as the `web`
//! process of a site, so the run image needs nothing but this executable (no shell, no libc,
//! no web server package).
//!
//! HTTP/1.1 with keep-alive, `GET` and `HEAD` only; `/dir/` serves `dir/index.html`, `/dir`
//! redirects to `/dir/`, a missing file answers `404.html` when the site has one. Paths are
//! taken apart lexically before anything is opened: `..` never climbs out of the root.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The port served when `PORT` is not set, as the buildpacks' processes default to.
pub const DEFAULT_PORT: u16 = 8080;

/// At most this many connections are served at once; more wait in the listen queue, so a
/// flood costs threads only up to this bound.
const MAX_CONNECTIONS: usize = 128;

/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;

/// The `Content-Type` of a file, from its extension; `application/octet-stream` when unknown.
pub fn mime_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" | "cjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "txt" | "text" => "text/plain; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "bmp" => "image/bmp",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "otf" => "font/otf",
        "wasm" => "application/wasm",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        _ => "application/octet-stream",
    }
}

/// The file a request path names under the root, as a relative path of plain components, and
/// whether the request ended with `/`. `None` for a path that is not one (no leading `/`, bad
/// percent-encoding, a NUL, a `..` or a backslash).
pub fn relative_path(target: &str) -> Option<(PathBuf, bool)> {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    if !path.starts_with('/') {
        return None;
    }
    let decoded = percent_decode(path)?;
    let mut out = PathBuf::new();
    for part in decoded.split('/') {
        match part {
            "" | "." => {}
            // A backslash is a separator to some clients' eyes: refuse rather than guess.
            ".." => return None,
            p if p.contains(['\0', '\\']) => return None,
            p => out.push(p),
        }
    }
    Some((out, decoded.ends_with('/')))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// One parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    target: String,
    /// Whether the connection stays open after the answer.
    keep_alive: bool,
}

/// Reads one request head; `Ok(None)` at a clean end of the connection.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader.take(MAX_HEAD as u64).read_until(b'\n', &mut line)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if line == b"\r\n" || line == b"\n" {
            // Blank lines before a request line are allowed (RFC 9112, 2.2).
            if head.is_empty() {
                continue;
            }
            break;
        }
        head.push(String::from_utf8_lossy(&line).trim_end().to_owned());
        if head.iter().map(String::len).sum::<usize>() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
    }
    let mut parts = head[0].split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let mut keep_alive = version == "HTTP/1.1";
    for header in &head[1..] {
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim().to_ascii_lowercase();
            if name.eq_ignore_ascii_case("connection") {
                keep_alive = match value.as_str() {
                    "close" => false,
                    "keep-alive" => true,
                    _ => keep_alive,
                };
            } else if name.eq_ignore_ascii_case("content-length") && value != "0"
                || name.eq_ignore_ascii_case("transfer-encoding")
            {
                // A GET with a body is not worth reading: close after answering.
                keep_alive = false;
            }
        }
    }
    Ok(Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        keep_alive,
    }))
}

/// What a request is answered with.
enum Answer {
    File {
        status: &'static str,
        file: File,
        len: u64,
        mime: &'static str,
    },
    Redirect(String),
    Status(&'static str),
}

/// The answer to `target` from the site in `root`.
fn answer(root: &Path, method: &str, target: &str) -> Answer {
    if method != "GET" && method != "HEAD" {
        return Answer::Status("405 Method Not Allowed");
    }
    let Some((rel, slash)) = relative_path(target) else {
        return Answer::Status("400 Bad Request");
    };
    let path = root.join(&rel);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            if !slash && !rel.as_os_str().is_empty() {
                let location = target.split(['?', '#']).next().unwrap_or("/");
                return Answer::Redirect(format!("{location}/"));
            }
            open(&path.join("index.html"), "200 OK").unwrap_or_else(|| not_found(root))
        }
        Ok(_) => open(&path, "200 OK").unwrap_or_else(|| not_found(root)),
        Err(_) => not_found(root),
    }
}

fn not_found(root: &Path) -> Answer {
    open(&root.join("404.html"), "404 Not Found").unwrap_or(Answer::Status("404 Not Found"))
}

fn open(path: &Path, status: &'static str) -> Option<Answer> {
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    meta.is_file().then(|| Answer::File {
        status,
        file,
        len: meta.len(),
        mime: mime_type(path),
    })
}

/// Serves one connection until it closes, errs or idles out.
fn serve_connection(root: &Path, stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let request = match read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                write_status(&mut writer, "400 Bad Request", false, true)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let head_only = request.method == "HEAD";
        let keep = request.keep_alive;
        match answer(root, &request.method, &request.target) {
            Answer::File {
                status,
                mut file,
                len,
                mime,
            } => {
                write!(
                    writer,
                    "HTTP/1.1 {status}\r\nContent-Type: {mime}\r\nContent-Length: {len}\r\n\
                     X-Content-Type-Options: nosniff\r\nConnection: {}\r\n\r\n",
                    if keep { "keep-alive" } else { "close" }
                )?;
                if !head_only {
                    // Send exactly the length announced, even if the file grew meanwhile.
                    io::copy(&mut (&mut file).take(len), &mut writer)?;
                }
            }
            Answer::Redirect(location) => {
                write!(
                    writer,
                    "HTTP/1.1 301 Moved Permanently\r\nLocation: {location}\r\n\
                     Content-Length: 0\r\nConnection: {}\r\n\r\n",
                    if keep { "keep-alive" } else { "close" }
                )?;
            }
            Answer::Status(status) => {
                let allow = status.starts_with("405");
                write_status(&mut writer, status, keep, allow)?;
            }
        }
        writer.flush()?;
        if !keep {
            return Ok(());
        }
    }
}

fn write_status(out: &mut impl Write, status: &str, keep: bool, allow: bool) -> io::Result<()> {
    let body = format!("{status}\n");
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         {}Connection: {}\r\n\r\n{body}",
        body.len(),
        if allow { "Allow: GET, HEAD\r\n" } else { "" },
        if keep { "keep-alive" } else { "close" }
    )
}

/// Serves the site in `root` on `listener` until the process ends: one thread per connection,
/// at most [`MAX_CONNECTIONS`] at a time.
pub fn serve(root: PathBuf, listener: TcpListener) -> io::Result<()> {
    let root = Arc::new(root);
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            // A connection reset before accept is the client's business, not the server's end.
            Err(_) => continue,
        };
        while active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            std::thread::sleep(Duration::from_millis(5));
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (root, active) = (root.clone(), active.clone());
        std::thread::spawn(move || {
            let _ = serve_connection(&root, stream);
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
    Ok(())
}

/// The port to listen on: `PORT` when set (an error names a bad value), else
/// [`DEFAULT_PORT`].
pub fn port_from_env(value: Option<&str>) -> Result<u16, String> {
    match value {
        None | Some("") => Ok(DEFAULT_PORT),
        Some(text) => text
            .parse()
            .map_err(|_| format!("PORT={text:?} is not a port number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_leave_the_root() {
        assert_eq!(
            relative_path("/a/b.html?x=1"),
            Some((PathBuf::from("a/b.html"), false))
        );
        assert_eq!(relative_path("/docs/"), Some((PathBuf::from("docs"), true)));
        assert_eq!(
            relative_path("/a%20b.txt"),
            Some((PathBuf::from("a b.txt"), false))
        );
        assert_eq!(
            relative_path("/./x//y"),
            Some((PathBuf::from("x/y"), false))
        );
        for bad in [
            "/../etc/passwd",
            "/a/%2e%2e/b",
            "/a%00",
            "x",
            "/%zz",
            "/a\\..\\b",
        ] {
            assert_eq!(relative_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn mime_types_follow_the_extension() {
        assert_eq!(
            mime_type(Path::new("index.HTML")),
            "text/html; charset=utf-8"
        );
        assert_eq!(mime_type(Path::new("a.css")), "text/css; charset=utf-8");
        assert_eq!(
            mime_type(Path::new("app.mjs")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(mime_type(Path::new("logo.svg")), "image/svg+xml");
        assert_eq!(mime_type(Path::new("m.wasm")), "application/wasm");
        assert_eq!(mime_type(Path::new("blob")), "application/octet-stream");
    }

    #[test]
    fn request_heads_set_keep_alive() {
        let mut one = &b"\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n"[..];
        let request = read_request(&mut one).unwrap().unwrap();
        assert_eq!(request.target, "/x");
        assert!(request.keep_alive);
        let mut old = &b"GET / HTTP/1.0\r\n\r\n"[..];
        assert!(!read_request(&mut old).unwrap().unwrap().keep_alive);
        let mut close = &b"GET / HTTP/1.1\r\nconnection: Close\r\n\r\n"[..];
        assert!(!read_request(&mut close).unwrap().unwrap().keep_alive);
        let mut garbage = &b"NONSENSE\r\n\r\n"[..];
        assert!(read_request(&mut garbage).is_err());
        let mut empty = &b""[..];
        assert!(read_request(&mut empty).unwrap().is_none());
    }

    #[test]
    fn ports_come_from_the_environment() {
        assert_eq!(port_from_env(None), Ok(DEFAULT_PORT));
        assert_eq!(port_from_env(Some("9000")), Ok(9000));
        assert!(port_from_env(Some("http")).unwrap_err().contains("http"));
    }
}

//! A fault-injecting HTTP/1.1 proxy for registry tests: it stands between a registry client and
//! the real `docker-registry` on loopback, forwards every request untouched, and gives the
//! requests that a [`Rule`] picks one [`Fault`] each (an error status, a reset connection, a
//! short, slow, stalled or corrupted body, an expired token). A real registry cannot be made to
//! fail on demand; everything a request without a fault gets is the real registry's answer.
//!
//! Plain `std::net` and one thread per client connection: each request opens its own upstream
//! connection (`Connection: close`) and bodies are streamed, so a large blob passes in bounded
//! memory. Only a fault that has to know or change a body's length (a corrupted JSON body, half
//! of a chunked body) reads that one body whole.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The longest a held connection (a stall, a request never answered) is kept open when its
/// client does not close it, so a forgotten client cannot keep a test's threads alive forever.
const HOLD_LIMIT: Duration = Duration::from_secs(120);
/// Copy buffer for streamed bodies.
const BUF: usize = 64 * 1024;
/// Longest request or response head accepted; a registry's heads are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Largest body a fault reads whole to change its framing; blobs larger than this that need
/// it are refused instead of exhausting the test's memory.
const MAX_BUFFERED: u64 = 64 << 20;
/// How long tokens issued at `/token` stay valid, as announced in `expires_in`.
const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Which body of an exchange a fault acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The request body the client sends (a blob upload, a manifest push).
    Upload,
    /// The answer body the registry sends back (a blob or manifest pull).
    Answer,
}

/// One fault the proxy gives a request instead of (or while) forwarding it.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status without forwarding, with an OCI error body
    /// `{"errors":[{"code":"UNAVAILABLE","message":"fault proxy: status N"}]}` and, when set,
    /// `Retry-After: SECONDS`. The request body is read first, so the connection stays usable.
    Status {
        /// The HTTP status code answered.
        code: u16,
        /// Seconds for a `Retry-After` header, if any.
        retry_after: Option<u32>,
    },
    /// Read the whole request, then reset the connection (RST, no answer at all).
    ResetBeforeHeaders,
    /// A request whose answer has a body (GET, DELETE): forward it, send the answer's headers
    /// and half its body, then reset. A request whose answer has none (PUT, PATCH, POST, HEAD,
    /// or any request carrying a body): read half the request body, then reset.
    ResetMidBody,
    /// A request carrying a body: forward only half of it upstream and close the upstream
    /// connection, then relay whatever the registry says about the cut body and close. Any
    /// other request: forward it, send the answer's headers with the real `Content-Length` and
    /// half the body, then close.
    ShortBody,
    /// Throttle one direction's body to about this many bytes per second.
    Trickle {
        /// The rate the body is sent at.
        bytes_per_second: usize,
        /// Which body is slowed.
        direction: Direction,
    },
    /// A request carrying a body: stop reading it once the headers are in and hold. Any other
    /// request: forward it, send the answer's headers, then nothing. The hold ends when the
    /// client closes, when the proxy is dropped, or after 120 s.
    StallAfterHeaders,
    /// Read the request and never answer; held as [`Fault::StallAfterHeaders`] is.
    NeverAnswer,
    /// Change one direction's body: a JSON body (its first byte is `{`) gets a space inserted
    /// after that brace (still valid JSON, another digest; `Content-Length` fixed), any other
    /// body has its middle byte flipped.
    CorruptBody {
        /// Which body is changed.
        direction: Direction,
    },
    /// Token-auth mode: revoke the token the request carried and answer 401 with a fresh
    /// Bearer challenge (the request body is read first). Without token auth the 401 and its
    /// challenge are given all the same, with nothing to revoke.
    ExpireToken,
}

impl Fault {
    /// The fault's name as [`Seen::fault`] records it: the variant's name, e.g. `"Status"`.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Status { .. } => "Status",
            Fault::ResetBeforeHeaders => "ResetBeforeHeaders",
            Fault::ResetMidBody => "ResetMidBody",
            Fault::ShortBody => "ShortBody",
            Fault::Trickle { .. } => "Trickle",
            Fault::StallAfterHeaders => "StallAfterHeaders",
            Fault::NeverAnswer => "NeverAnswer",
            Fault::CorruptBody { .. } => "CorruptBody",
            Fault::ExpireToken => "ExpireToken",
        }
    }
}

/// Which requests get a fault: those whose method and path match, counted from 1 in the order
/// the proxy receives them; the `nth` match and the `times - 1` after it get the fault.
///
/// Every rule counts every request it matches, whether or not an earlier rule gave that
/// request its fault; the first rule (in the order given) whose window covers a request wins.
/// In token-auth mode rules are consulted before the proxy's own token check, so a request
/// without a token counts too.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The method to match (any case), `None` for any method.
    pub method: Option<String>,
    /// A substring of the request target (path and query).
    pub path_contains: String,
    /// 1-based: the first matching request that gets the fault.
    pub nth: usize,
    /// How many matching requests from the `nth` on get it; `None` for all of them.
    pub times: Option<usize>,
    /// What they get.
    pub fault: Fault,
}

impl Rule {
    /// A rule giving `fault` to every request with this method (any when `None`) whose target
    /// contains `path_contains`.
    pub fn new(method: Option<&str>, path_contains: &str, fault: Fault) -> Rule {
        Rule {
            method: method.map(str::to_owned),
            path_contains: path_contains.to_owned(),
            nth: 1,
            times: None,
            fault,
        }
    }

    /// Starts giving the fault at the `n`th matching request (1-based).
    pub fn nth(self, n: usize) -> Rule {
        Rule {
            nth: n.max(1),
            ..self
        }
    }

    /// Gives the fault to `n` matching requests only.
    pub fn times(self, n: usize) -> Rule {
        Rule {
            times: Some(n),
            ..self
        }
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && target.contains(&self.path_contains)
    }
}

/// One request the proxy received, as [`FaultProxy::seen`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The request method.
    pub method: String,
    /// The request target, path and query.
    pub path: String,
    /// The status the client was sent, `None` if no answer head reached it.
    pub status: Option<u16>,
    /// The name of the fault the request got ([`Fault::name`]), if any.
    pub fault: Option<String>,
}

/// A fault-injecting proxy on a free loopback port in front of a registry. Dropping it stops
/// accepting, cuts every open connection (held ones included) and joins its threads.
pub struct FaultProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Plain proxy: every request goes to `upstream` (a `127.0.0.1:PORT` string) unless a rule
    /// matches.
    pub fn start(upstream: &str, rules: Vec<Rule>) -> FaultProxy {
        FaultProxy::launch(upstream, rules, false)
    }

    /// Token-auth mode: the proxy itself demands `Authorization: Bearer <token>` on every
    /// `/v2/` request (401 and a `WWW-Authenticate: Bearer realm="http://PROXY/token",
    /// service="fault-proxy",scope="repository:NAME:pull,push"` challenge without one) and
    /// issues tokens at `GET /token` (`{"token","access_token","expires_in":300}`), no
    /// credentials asked. The upstream registry needs no auth. [`Fault::ExpireToken`] revokes
    /// those tokens.
    pub fn start_with_token_auth(upstream: &str, rules: Vec<Rule>) -> FaultProxy {
        FaultProxy::launch(upstream, rules, true)
    }

    fn launch(upstream: &str, rules: Vec<Rule>, token_auth: bool) -> FaultProxy {
        let upstream_addr = upstream
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("fault proxy: upstream {upstream:?} is not HOST:PORT"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("fault proxy: bind a loopback port");
        let addr = listener.local_addr().expect("fault proxy: local address");
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            upstream_addr,
            me: addr.to_string(),
            matched: Mutex::new(vec![0; rules.len()]),
            rules,
            token_auth,
            seen: Mutex::new(Vec::new()),
            faults: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            tokens: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            sockets: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
        });
        let accepting = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || accepting.accept(listener))
            .expect("fault proxy: spawn the accept thread");
        FaultProxy {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// `127.0.0.1:PORT`, to use as the registry part of image references.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Every request received so far, in the order received.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.shared.seen).clone()
    }

    /// How many requests got a fault.
    pub fn faults_given(&self) -> usize {
        self.shared.faults.load(Ordering::SeqCst)
    }

    /// Client connections open right now, held ones included; tests use it to see a hold end
    /// when its client closes.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The acceptor blocks in accept(): one connection wakes it to see the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for socket in lock(&self.shared.sockets).values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

/// A poisoned lock only means another connection's thread panicked; the data stays usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct Shared {
    upstream: String,
    upstream_addr: SocketAddr,
    me: String,
    rules: Vec<Rule>,
    token_auth: bool,
    /// How many requests each rule has matched so far.
    matched: Mutex<Vec<usize>>,
    seen: Mutex<Vec<Seen>>,
    faults: AtomicUsize,
    stop: AtomicBool,
    /// Valid tokens and when they were issued.
    tokens: Mutex<HashMap<String, Instant>>,
    next_id: AtomicU64,
    /// A clone of every open socket, client and upstream, so Drop can cut them all.
    sockets: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    open: AtomicUsize,
}

/// A socket listed in [`Shared::sockets`] for as long as this lives.
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.shared.sockets).remove(&self.id);
    }
}

/// Where a request is listed in [`Shared::seen`], to record the status it is answered.
struct Mark<'a> {
    shared: &'a Shared,
    index: usize,
}

impl Mark<'_> {
    fn record(&self, status: Option<u16>) {
        if let Some(seen) = lock(&self.shared.seen).get_mut(self.index) {
            seen.status = status;
        }
    }

    /// Sends an answer head, recorded first so that a client that has read it finds its
    /// status in [`FaultProxy::seen`]; taken back if the head could not be sent.
    fn send(&self, client: &mut TcpStream, head: &[u8], code: u16) -> io::Result<()> {
        self.record(Some(code));
        client.write_all(head).inspect_err(|_| self.record(None))
    }
}

/// How a connection goes on after an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    KeepAlive,
    Close,
    Reset,
}

/// How a body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (answers only).
    Eof,
}

struct Request {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
    framing: Framing,
    close: bool,
    /// The client sent `Expect: 100-continue` and has not been told to go on yet.
    continue_pending: bool,
}

impl Request {
    fn has_body(&self) -> bool {
        match self.framing {
            Framing::None | Framing::Length(0) => false,
            Framing::Length(_) | Framing::Chunked | Framing::Eof => true,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn is_head(&self) -> bool {
        self.method.eq_ignore_ascii_case("HEAD")
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    /// Tells a client waiting on `Expect: 100-continue` to send its body; the proxy answers
    /// that itself rather than forwarding the expectation, since it reads the body before the
    /// registry answers.
    fn go_on(&mut self, req: &mut Request) -> io::Result<()> {
        if req.continue_pending {
            req.continue_pending = false;
            self.writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        Ok(())
    }

    fn drain(&mut self, req: &mut Request) -> io::Result<()> {
        self.go_on(req)?;
        copy_body(&mut self.reader, &mut io::sink(), req.framing, None, None)
    }
}

/// What a forwarded exchange does to the request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upload {
    Pass,
    Trickle(usize),
    Corrupt,
    Short,
}

/// What a forwarded exchange does to the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Pass,
    Trickle(usize),
    Corrupt,
    Short,
    ResetMid,
    Stall,
}

impl Shared {
    fn accept(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else {
                // Out of descriptors or a connection aborted before accept: try again shortly.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            self.open.fetch_add(1, Ordering::SeqCst);
            let shared = Arc::clone(&self);
            let spawned = std::thread::Builder::new()
                .name("fault-proxy-conn".to_owned())
                .spawn(move || {
                    shared.serve(stream);
                    shared.open.fetch_sub(1, Ordering::SeqCst);
                });
            match spawned {
                Ok(worker) => {
                    let mut workers = lock(&self.workers);
                    workers.retain(|w| !w.is_finished());
                    workers.push(worker);
                }
                Err(_) => {
                    self.open.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn register(&self, socket: &TcpStream) -> io::Result<Registered<'_>> {
        let mut sockets = lock(&self.sockets);
        // Checked under the lock Drop sweeps with, so no socket escapes the sweep.
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("fault proxy is stopping"));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        sockets.insert(id, socket.try_clone()?);
        Ok(Registered { shared: self, id })
    }

    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let Ok(registered) = self.register(&stream) else {
            return;
        };
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let mut conn = Conn {
            reader: BufReader::with_capacity(BUF, stream),
            writer,
        };
        let end = loop {
            let mut req = match read_request(&mut conn.reader) {
                Ok(Some(req)) => req,
                Ok(None) | Err(_) => break End::Close,
            };
            let (index, fault) = self.admit(&req);
            let status = Mark {
                shared: self,
                index,
            };
            let result = self.exchange(&mut conn, &mut req, fault.as_ref(), &status);
            match result {
                Ok(End::KeepAlive) if !req.close => {}
                Ok(End::KeepAlive) | Err(_) => break End::Close,
                Ok(end) => break end,
            }
        };
        if end == End::Reset {
            set_linger_zero(&conn.writer);
        } else {
            let _ = conn.writer.shutdown(Shutdown::Write);
        }
        // The RST (or FIN) goes out when the last descriptor of the socket closes, the sweep
        // list's clone included.
        drop(registered);
        drop(conn);
    }

    /// Records the request and picks its fault, under one lock so `seen` order and rule
    /// counts agree.
    fn admit(&self, req: &Request) -> (usize, Option<Fault>) {
        let mut seen = lock(&self.seen);
        let mut matched = lock(&self.matched);
        let mut chosen = None;
        for (rule, count) in self.rules.iter().zip(matched.iter_mut()) {
            if !rule.matches(&req.method, &req.target) {
                continue;
            }
            *count += 1;
            let in_window = *count >= rule.nth && rule.times.is_none_or(|t| *count < rule.nth + t);
            if chosen.is_none() && in_window {
                chosen = Some(rule.fault.clone());
            }
        }
        if chosen.is_some() {
            self.faults.fetch_add(1, Ordering::SeqCst);
        }
        seen.push(Seen {
            method: req.method.clone(),
            path: req.target.clone(),
            status: None,
            fault: chosen.as_ref().map(|f| f.name().to_owned()),
        });
        (seen.len() - 1, chosen)
    }

    fn exchange(
        &self,
        conn: &mut Conn,
        req: &mut Request,
        fault: Option<&Fault>,
        status: &Mark<'_>,
    ) -> io::Result<End> {
        match fault {
            Some(Fault::Status { code, retry_after }) => {
                conn.drain(req)?;
                let mut extra = Vec::new();
                if let Some(seconds) = retry_after {
                    extra.push(("Retry-After".to_owned(), seconds.to_string()));
                }
                let message = format!("fault proxy: status {code}");
                send_error(conn, req, *code, &extra, "UNAVAILABLE", &message, status)?;
                return Ok(End::KeepAlive);
            }
            Some(Fault::ResetBeforeHeaders) => {
                conn.drain(req)?;
                return Ok(End::Reset);
            }
            Some(Fault::NeverAnswer) => {
                conn.drain(req)?;
                self.hold(&conn.writer);
                return Ok(End::Close);
            }
            Some(Fault::StallAfterHeaders) if req.has_body() => {
                self.hold(&conn.writer);
                return Ok(End::Close);
            }
            Some(Fault::ResetMidBody) if answer_is_bodiless(req) => {
                conn.go_on(req)?;
                read_half_body(&mut conn.reader, req.framing)?;
                return Ok(End::Reset);
            }
            Some(Fault::ExpireToken) => {
                conn.drain(req)?;
                if let Some(token) = bearer(req) {
                    lock(&self.tokens).remove(token);
                }
                self.challenge(conn, req, "fault proxy: token expired", status)?;
                return Ok(End::KeepAlive);
            }
            _ => {}
        }
        if self.token_auth {
            if req.path() == "/token" {
                conn.drain(req)?;
                self.issue_token(conn, req, status)?;
                return Ok(End::KeepAlive);
            }
            if req.path().starts_with("/v2") && !self.token_valid(req) {
                conn.drain(req)?;
                self.challenge(conn, req, "fault proxy: authentication required", status)?;
                return Ok(End::KeepAlive);
            }
        }
        let upload = match fault {
            Some(Fault::Trickle {
                bytes_per_second,
                direction: Direction::Upload,
            }) => Upload::Trickle(*bytes_per_second),
            Some(Fault::CorruptBody {
                direction: Direction::Upload,
            }) => Upload::Corrupt,
            Some(Fault::ShortBody) if req.has_body() => Upload::Short,
            _ => Upload::Pass,
        };
        let answer = match fault {
            Some(Fault::Trickle {
                bytes_per_second,
                direction: Direction::Answer,
            }) => Answer::Trickle(*bytes_per_second),
            Some(Fault::CorruptBody {
                direction: Direction::Answer,
            }) => Answer::Corrupt,
            Some(Fault::ShortBody) if !req.has_body() => Answer::Short,
            Some(Fault::ResetMidBody) => Answer::ResetMid,
            Some(Fault::StallAfterHeaders) => Answer::Stall,
            _ => Answer::Pass,
        };
        self.forward(conn, req, upload, answer, status)
    }

    fn forward(
        &self,
        conn: &mut Conn,
        req: &mut Request,
        upload: Upload,
        answer: Answer,
        status: &Mark<'_>,
    ) -> io::Result<End> {
        let upstream = match TcpStream::connect_timeout(&self.upstream_addr, Duration::from_secs(5))
        {
            Ok(upstream) => upstream,
            Err(e) => {
                conn.drain(req)?;
                let message = format!("fault proxy: upstream {} unreachable: {e}", self.upstream);
                send_error(conn, req, 502, &[], "UNAVAILABLE", &message, status)?;
                return Ok(End::KeepAlive);
            }
        };
        let _ = upstream.set_nodelay(true);
        let registered = self.register(&upstream)?;
        let mut up_writer = upstream.try_clone()?;
        let mut up_reader = BufReader::with_capacity(BUF, upstream);

        conn.go_on(req)?;
        // An upload the registry stops reading (an early error answer) still gets its answer
        // relayed; the client's unread rest of the body then forbids reusing the connection.
        // A client that stops sending leaves the registry waiting for the rest: the half-close
        // makes it answer (or give up) at once, and the timeout bounds a registry that does not.
        let mut body_cut = false;
        match self.send_request(conn, req, upload, &mut up_writer) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(e),
            Err(_) => {
                body_cut = true;
                let _ = up_writer.shutdown(Shutdown::Write);
                up_reader
                    .get_ref()
                    .set_read_timeout(Some(Duration::from_secs(10)))?;
            }
        }
        if upload == Upload::Short {
            let _ = up_writer.shutdown(Shutdown::Write);
            // The rest of the body is the client's to send; read it so its answer can arrive.
            // A chunked body was read whole already.
            if let Framing::Length(n) = req.framing {
                let rest = Framing::Length(n - n / 2);
                let _ = copy_body(&mut conn.reader, &mut io::sink(), rest, None, None);
            }
            up_reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(10)))?;
            self.relay(conn, req, &mut up_reader, Answer::Pass, status)?;
            drop(registered);
            return Ok(End::Close);
        }
        let end = self.relay(conn, req, &mut up_reader, answer, status)?;
        drop(registered);
        Ok(if body_cut && end == End::KeepAlive {
            End::Close
        } else {
            end
        })
    }

    /// Writes the request head and body upstream, changed as `upload` says.
    fn send_request(
        &self,
        conn: &mut Conn,
        req: &Request,
        upload: Upload,
        up: &mut TcpStream,
    ) -> io::Result<()> {
        let head = |length: Option<u64>| {
            let mut head = format!("{} {} {}\r\n", req.method, req.target, req.version);
            for (name, value) in &req.headers {
                let lower = name.to_ascii_lowercase();
                let hop = matches!(
                    lower.as_str(),
                    "connection" | "keep-alive" | "proxy-connection" | "expect"
                );
                let framing = matches!(lower.as_str(), "content-length" | "transfer-encoding");
                if hop || (length.is_some() && framing) {
                    continue;
                }
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            if let Some(length) = length {
                head.push_str(&format!("Content-Length: {length}\r\n"));
            }
            head.push_str("Connection: close\r\n\r\n");
            head.into_bytes()
        };
        let reader = &mut conn.reader;
        match (upload, req.framing) {
            (Upload::Pass, framing) => {
                up.write_all(&head(None))?;
                copy_body(reader, up, framing, None, None)
            }
            (Upload::Trickle(rate), framing) => {
                up.write_all(&head(None))?;
                let mut throttle = Throttle::new(rate, &self.stop);
                copy_body(reader, up, framing, Some(&mut throttle), None)
            }
            (Upload::Corrupt, Framing::Length(n)) if !rewrite_whole(reader, n)? => {
                up.write_all(&head(None))?;
                copy_body(reader, up, Framing::Length(n), None, Some(n / 2))
            }
            (Upload::Corrupt, framing) => {
                let mut body = read_body(reader, framing)?;
                corrupt(&mut body);
                up.write_all(&head(Some(body.len() as u64)))?;
                up.write_all(&body)
            }
            (Upload::Short, Framing::Length(n)) => {
                up.write_all(&head(None))?;
                copy_body(reader, up, Framing::Length(n / 2), None, None)
            }
            (Upload::Short, framing) => {
                let body = read_body(reader, framing)?;
                up.write_all(&head(Some(body.len() as u64)))?;
                up.write_all(&body[..body.len() / 2])
            }
        }
    }

    /// Reads the registry's answer and sends it to the client, changed as `answer` says.
    fn relay(
        &self,
        conn: &mut Conn,
        req: &Request,
        up: &mut BufReader<TcpStream>,
        answer: Answer,
        status: &Mark<'_>,
    ) -> io::Result<End> {
        let (status_line, code, headers) = loop {
            let lines = read_head(up)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed without answer",
                )
            })?;
            let status_line = lines[0].clone();
            let code: u16 = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
            // An interim answer (100 Continue) is not what the client waits for.
            if (100..200).contains(&code) && code != 101 {
                continue;
            }
            break (status_line, code, parse_headers(&lines[1..])?);
        };
        let framing =
            if req.is_head() || (100..200).contains(&code) || code == 204 || code == 304 {
                Framing::None
            } else if header(&headers, "transfer-encoding")
                .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
            {
                Framing::Chunked
            } else if let Some(length) = header(&headers, "content-length") {
                Framing::Length(length.trim().parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length")
                })?)
            } else {
                Framing::Eof
            };
        let close = req.close || framing == Framing::Eof;
        let client = &mut conn.writer;
        let head = |length: Option<u64>, close: bool| {
            let mut head = format!("{status_line}\r\n");
            for (name, value) in &headers {
                let lower = name.to_ascii_lowercase();
                if matches!(lower.as_str(), "connection" | "keep-alive") {
                    continue;
                }
                if length.is_some()
                    && matches!(lower.as_str(), "content-length" | "transfer-encoding")
                {
                    continue;
                }
                if lower == "location" {
                    let value =
                        value.replace(&format!("//{}", self.upstream), &format!("//{}", self.me));
                    head.push_str(&format!("{name}: {value}\r\n"));
                    continue;
                }
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            if let Some(length) = length {
                head.push_str(&format!("Content-Length: {length}\r\n"));
            }
            if close {
                head.push_str("Connection: close\r\n");
            }
            head.push_str("\r\n");
            head.into_bytes()
        };
        let keep = if close { End::Close } else { End::KeepAlive };
        match answer {
            Answer::Pass | Answer::Trickle(_) => {
                status.send(client, &head(None, close), code)?;
                let mut throttle = match answer {
                    Answer::Trickle(rate) => Some(Throttle::new(rate, &self.stop)),
                    _ => None,
                };
                copy_body(up, client, framing, throttle.as_mut(), None)?;
                Ok(keep)
            }
            Answer::Stall => {
                status.send(client, &head(None, true), code)?;
                // The registry's connection is not needed for the hold; release it now.
                let _ = up.get_ref().shutdown(Shutdown::Both);
                self.hold(client);
                Ok(End::Close)
            }
            Answer::ResetMid | Answer::Short => {
                let end = if answer == Answer::Short {
                    End::Close
                } else {
                    End::Reset
                };
                if let Framing::Length(n) = framing {
                    status.send(client, &head(None, true), code)?;
                    copy_body(up, client, Framing::Length(n / 2), None, None)?;
                } else {
                    let body = read_body(up, framing)?;
                    status.send(client, &head(Some(body.len() as u64), true), code)?;
                    client.write_all(&body[..body.len() / 2])?;
                }
                Ok(end)
            }
            Answer::Corrupt => match framing {
                Framing::None => {
                    status.send(client, &head(None, close), code)?;
                    Ok(keep)
                }
                Framing::Length(n) if !rewrite_whole(up, n)? => {
                    status.send(client, &head(None, close), code)?;
                    copy_body(up, client, framing, None, Some(n / 2))?;
                    Ok(keep)
                }
                _ => {
                    let mut body = read_body(up, framing)?;
                    corrupt(&mut body);
                    let close = req.close;
                    status.send(client, &head(Some(body.len() as u64), close), code)?;
                    client.write_all(&body)?;
                    Ok(if close { End::Close } else { End::KeepAlive })
                }
            },
        }
    }

    /// Keeps a connection open without answering until its client closes, the proxy stops,
    /// or [`HOLD_LIMIT`] passes. Polls for the peer's hang-up only, so a client still sending
    /// a body the proxy no longer reads does not wake it.
    fn hold(&self, client: &TcpStream) {
        let deadline = Instant::now() + HOLD_LIMIT;
        while !self.stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: client.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd for a descriptor `client` keeps open during the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, 200) };
            if rc < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let gone = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
            if rc > 0 && pfd.revents & gone != 0 {
                return;
            }
        }
    }

    fn token_valid(&self, req: &Request) -> bool {
        let Some(token) = bearer(req) else {
            return false;
        };
        let mut tokens = lock(&self.tokens);
        match tokens.get(token) {
            Some(issued) if issued.elapsed() < TOKEN_LIFETIME => true,
            Some(_) => {
                tokens.remove(token);
                false
            }
            None => false,
        }
    }

    fn issue_token(&self, conn: &mut Conn, req: &Request, status: &Mark<'_>) -> io::Result<()> {
        let serial = self.next_id.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let digest = Sha256::digest(format!("{}/{serial}/{nanos}", self.me));
        let token = format!("fp-{}", &hex::encode(digest)[..32]);
        lock(&self.tokens).insert(token.clone(), Instant::now());
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME.as_secs(),
        })
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if req.close {
                "Connection: close\r\n"
            } else {
                ""
            }
        );
        status.send(&mut conn.writer, head.as_bytes(), 200)?;
        if !req.is_head() {
            conn.writer.write_all(body.as_bytes())?;
        }
        Ok(())
    }

    fn challenge(
        &self,
        conn: &mut Conn,
        req: &Request,
        message: &str,
        status: &Mark<'_>,
    ) -> io::Result<()> {
        let mut value = format!(
            "Bearer realm=\"http://{}/token\",service=\"fault-proxy\"",
            self.me
        );
        if let Some(name) = repository_name(req.path()) {
            value.push_str(&format!(",scope=\"repository:{name}:pull,push\""));
        }
        let extra = [("WWW-Authenticate".to_owned(), value)];
        send_error(conn, req, 401, &extra, "UNAUTHORIZED", message, status)
    }
}

/// An answer to `req` has no body to cut: the fault cuts the request body instead.
fn answer_is_bodiless(req: &Request) -> bool {
    req.has_body()
        || ["HEAD", "PUT", "PATCH", "POST"]
            .iter()
            .any(|m| req.method.eq_ignore_ascii_case(m))
}

/// The repository a `/v2/NAME/{manifests,blobs,tags}/...` path names.
fn repository_name(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let end = ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|marker| rest.find(marker))
        .min()?;
    Some(&rest[..end])
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.header("authorization")?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Answers `code` with an OCI error body (none for HEAD, which still gets its length).
fn send_error(
    conn: &mut Conn,
    req: &Request,
    code: u16,
    extra: &[(String, String)],
    error_code: &str,
    message: &str,
    status: &Mark<'_>,
) -> io::Result<()> {
    let body =
        serde_json::json!({"errors": [{"code": error_code, "message": message}]}).to_string();
    let mut head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason(code),
        body.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if req.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    status.send(&mut conn.writer, head.as_bytes(), code)?;
    if !req.is_head() {
        conn.writer.write_all(body.as_bytes())?;
    }
    Ok(())
}

fn reason(code: u16) -> &'static str {
    match code {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Fault",
    }
}

/// Makes the socket's close send RST instead of FIN.
fn set_linger_zero(socket: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a live `linger` value, on a
    // descriptor `socket` keeps open.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Changes a body as [`Fault::CorruptBody`] says.
fn corrupt(body: &mut Vec<u8>) {
    if body.first() == Some(&b'{') {
        body.insert(1, b' ');
    } else if !body.is_empty() {
        let middle = body.len() / 2;
        body[middle] ^= 0xff;
    }
}

/// Whether the `n`-byte body about to be read from `reader` is to be corrupted whole: empty,
/// or a JSON document (first byte `{`) small enough to hold; any other body is streamed with
/// its middle byte flipped.
fn rewrite_whole(reader: &mut impl BufRead, n: u64) -> io::Result<bool> {
    if n == 0 {
        return Ok(true);
    }
    Ok(n <= MAX_BUFFERED && reader.fill_buf()?.first() == Some(&b'{'))
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// Reads one head (start line and header lines); `None` on a clean end of stream before it.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take((MAX_HEAD - total + 1) as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a head",
            ));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(invalid("head too large"));
        }
        let text = String::from_utf8(line).map_err(|_| invalid("head is not UTF-8"))?;
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            // Blank lines before a request are allowed between keep-alive requests.
            if lines.is_empty() {
                continue;
            }
            return Ok(Some(lines));
        }
        lines.push(text.to_owned());
    }
}

fn parse_headers(lines: &[String]) -> io::Result<Vec<(String, String)>> {
    lines
        .iter()
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| invalid("bad header line"))?;
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let Some(lines) = read_head(reader)? else {
        return Ok(None);
    };
    let mut parts = lines[0].split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("bad request line"));
    };
    let headers = parse_headers(&lines[1..])?;
    let framing = if header(&headers, "transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        Framing::Chunked
    } else if let Some(length) = header(&headers, "content-length") {
        Framing::Length(
            length
                .trim()
                .parse()
                .map_err(|_| invalid("bad Content-Length"))?,
        )
    } else {
        Framing::None
    };
    let connection = header(&headers, "connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let close = if version.eq_ignore_ascii_case("HTTP/1.0") {
        !connection.contains("keep-alive")
    } else {
        connection.contains("close")
    };
    let continue_pending =
        header(&headers, "expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
    Ok(Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers,
        framing,
        close,
        continue_pending,
    }))
}

/// Paces writes to about `rate` bytes per second from its creation on.
struct Throttle<'a> {
    rate: usize,
    start: Instant,
    sent: u64,
    stop: &'a AtomicBool,
}

impl<'a> Throttle<'a> {
    fn new(rate: usize, stop: &'a AtomicBool) -> Throttle<'a> {
        Throttle {
            rate: rate.max(1),
            start: Instant::now(),
            sent: 0,
            stop,
        }
    }

    /// Pieces of a twentieth of a second keep the pace smooth.
    fn piece(&self) -> usize {
        (self.rate / 20).clamp(1, BUF)
    }

    /// Waits until `n` more bytes may go out.
    fn pace(&mut self, n: usize) -> io::Result<()> {
        self.sent += n as u64;
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(io::Error::other("fault proxy is stopping"));
            }
            let now = Instant::now();
            if now >= due {
                return Ok(());
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
    }
}

/// Copies exactly `n` bytes (all of them to EOF when `None`), paced by `throttle`; with
/// `flip_at`, the byte at that offset is inverted on the way.
fn copy_bytes(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    n: Option<u64>,
    mut throttle: Option<&mut Throttle<'_>>,
    mut flip_at: Option<u64>,
) -> io::Result<()> {
    let mut remaining = n.unwrap_or(u64::MAX);
    let mut done: u64 = 0;
    let mut buf = vec![0; BUF];
    while remaining > 0 {
        let mut want = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        if let Some(t) = &throttle {
            want = want.min(t.piece());
        }
        let got = match reader.read(&mut buf[..want]) {
            Ok(0) if n.is_none() => return Ok(()),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body shorter than announced",
                ))
            }
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(at) = flip_at {
            if at >= done && at < done + got as u64 {
                buf[(at - done) as usize] ^= 0xff;
                flip_at = None;
            }
        }
        if let Some(t) = throttle.as_deref_mut() {
            t.pace(got)?;
        }
        writer.write_all(&buf[..got])?;
        done += got as u64;
        remaining -= got as u64;
    }
    Ok(())
}

/// Copies one body as it is framed, chunk framing included, byte for byte.
fn copy_body(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    framing: Framing,
    throttle: Option<&mut Throttle<'_>>,
    flip_at: Option<u64>,
) -> io::Result<()> {
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => copy_bytes(reader, writer, Some(n), throttle, flip_at),
        Framing::Eof => copy_bytes(reader, writer, None, throttle, flip_at),
        Framing::Chunked => {
            let mut throttle = throttle;
            loop {
                let line = read_line(reader)?;
                writer.write_all(&line)?;
                let size = chunk_size(&line)?;
                if size == 0 {
                    loop {
                        let trailer = read_line(reader)?;
                        writer.write_all(&trailer)?;
                        if trailer == b"\r\n" || trailer == b"\n" {
                            return Ok(());
                        }
                    }
                }
                copy_bytes(reader, writer, Some(size), throttle.as_deref_mut(), None)?;
                writer.write_all(&read_line(reader)?)?;
            }
        }
    }
}

fn read_line(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    reader.by_ref().take(4096).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "chunked body cut inside a framing line",
        ));
    }
    Ok(line)
}

fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let text = std::str::from_utf8(line).map_err(|_| invalid("bad chunk size"))?;
    let digits = text.split(';').next().unwrap_or_default().trim();
    u64::from_str_radix(digits, 16).map_err(|_| invalid("bad chunk size"))
}

/// Reads a body whole, without its framing, for a fault that must know or change its length.
fn read_body(reader: &mut impl BufRead, framing: Framing) -> io::Result<Vec<u8>> {
    if let Framing::Length(n) = framing {
        if n > MAX_BUFFERED {
            return Err(invalid("body too large for this fault"));
        }
    }
    let mut body = Vec::new();
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            reader.by_ref().take(n).read_to_end(&mut body)?;
            if body.len() as u64 != n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body shorter than announced",
                ));
            }
        }
        Framing::Eof => {
            reader
                .by_ref()
                .take(MAX_BUFFERED + 1)
                .read_to_end(&mut body)?;
        }
        Framing::Chunked => loop {
            let size = chunk_size(&read_line(reader)?)?;
            if size == 0 {
                while !matches!(read_line(reader)?.as_slice(), b"\r\n" | b"\n") {}
                break;
            }
            reader.by_ref().take(size).read_to_end(&mut body)?;
            read_line(reader)?;
            if body.len() as u64 > MAX_BUFFERED {
                break;
            }
        },
    }
    if body.len() as u64 > MAX_BUFFERED {
        return Err(invalid("body too large for this fault"));
    }
    Ok(body)
}

/// Reads half a request body ([`Fault::ResetMidBody`]); of a chunked body, half its first
/// chunk, since its whole length is not known before its end.
fn read_half_body(reader: &mut impl BufRead, framing: Framing) -> io::Result<()> {
    match framing {
        Framing::None | Framing::Eof => Ok(()),
        Framing::Length(n) => copy_bytes(reader, &mut io::sink(), Some(n / 2), None, None),
        Framing::Chunked => {
            let size = chunk_size(&read_line(reader)?)?;
            copy_bytes(reader, &mut io::sink(), Some(size / 2), None, None)
        }
    }
}

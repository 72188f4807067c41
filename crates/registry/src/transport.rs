//! The HTTP layer under [`Client`](crate::Client): one reqwest client per registry and
//! transport profile, scheme discovery with the plain-HTTP fallback, and the retry loop. The
//! authentication challenge and token cache are in `auth`, timestamp parsing in `dates`.

mod auth;
mod dates;
mod watch;

pub(crate) use watch::within;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tokio::sync::{OnceCell, Semaphore};
use url::Url;

use self::auth::{CachedToken, TokenKey};
use self::dates::parse_http_date;
use crate::certs_d::{DirError, HostDir, HostFiles};
use crate::challenge::Challenge;
use crate::clock::Clock;
use crate::credentials::Credential;
use crate::error::{error_chain, parse_error_body, retryable_status, Error, Operation};
use crate::options::{api_host, Access, Profile, RegistryOptions};
use crate::tls::Identity;

/// The most of an error body Kiln reads to report the registry's message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Shared state behind every clone of a `Client`.
pub(crate) struct Inner {
    pub options: RegistryOptions,
    /// What token lifetimes are measured with.
    clock: Arc<dyn Clock>,
    tls: TlsMaterial,
    endpoints: Mutex<HashMap<(String, Profile), Arc<Endpoint>>>,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
    token_fetches: Mutex<HashMap<TokenKey, Arc<tokio::sync::Mutex<()>>>>,
    transfers: Arc<Semaphore>,
}

/// Certificates named by the user, read once when the client is made so a bad file fails
/// early and by name. The system's CAs are not here: see [`crate::tls`].
struct TlsMaterial {
    global_roots: Vec<CertificateDer<'static>>,
    registry_roots: Vec<(String, CertificateDer<'static>)>,
    identities: Vec<(String, Identity)>,
    /// `REGISTRY=DIR` certificate directories, each for one registry.
    registry_dirs: Vec<(String, HostFiles)>,
    /// The registry directories found in the certs.d directories, in search order; an
    /// unreadable one fails only the registry it is for.
    certs_d: Vec<HostDir>,
    /// Where the advice in a refusal says to put a registry's certificate: the first
    /// certs.d directory the user named, else Docker's if it is searched.
    advice_root: Option<PathBuf>,
}

impl TlsMaterial {
    /// The certificate directory files that apply to `registry`: those given for it by name
    /// (`REGISTRY=DIR`, as skopeo's `--cert-dir` replaces the search), else the first
    /// `HOST[:PORT]` directory found, as containers/image searches. Errors name the file.
    fn dir_files(&self, registry: &str) -> Result<Vec<&HostFiles>, Error> {
        let same = |r: &String| crate::options::same_registry(r, registry);
        let named: Vec<&HostFiles> = (self.registry_dirs.iter())
            .filter(|(r, _)| same(r))
            .map(|(_, files)| files)
            .collect();
        if !named.is_empty() {
            return Ok(named);
        }
        match self.certs_d.iter().find(|(host, _)| same(host)) {
            None => Ok(Vec::new()),
            Some((_, Ok(files))) => Ok(vec![files]),
            Some((_, Err(e))) => Err(Error::Tls {
                registry: registry.to_owned(),
                path: e.path.clone(),
                message: e.message.clone(),
            }),
        }
    }
}

/// What an endpoint's TLS setup says about it, for messages.
struct TlsNotes {
    client_certificate: Option<String>,
    certs_dir: Option<PathBuf>,
}

/// One registry host as reached with one transport profile.
pub(crate) struct Endpoint {
    /// The registry as the user named it, for messages and credential lookup.
    pub registry: String,
    /// The host the API is served from.
    host: String,
    profile: Profile,
    pub http: reqwest::Client,
    base: OnceCell<Url>,
    /// Held while a ping runs, so there is one at a time.
    ping_turn: tokio::sync::Mutex<()>,
    /// How many pings have failed, and the last failure: a caller that waited for a ping
    /// which then failed gets that failure instead of starting the whole retry budget again.
    ping_failures: Mutex<(u64, Option<Error>)>,
    challenge: Mutex<Option<Challenge>>,
    credential: OnceCell<Option<Credential>>,
    /// Whether a server asked this endpoint's TLS client for a client certificate.
    client_auth_requested: Arc<AtomicBool>,
    /// What the endpoint presents when asked (described), and where the user would put one.
    client_certificate: Option<String>,
    certs_dir: Option<PathBuf>,
}

/// What a request is for, to label errors.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub target: &'a str,
    pub operation: Operation,
}

impl Inner {
    pub fn new(options: RegistryOptions, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        let read_pem = |registry: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Error::Tls {
                registry: registry.to_owned(),
                path: path.to_owned(),
                message: e.to_string(),
            })
        };
        let parse_roots = |registry: &str, path: &std::path::Path| {
            let pem = read_pem(registry, path)?;
            crate::tls::parse_roots(&pem).map_err(|message| Error::Tls {
                registry: registry.to_owned(),
                path: path.to_owned(),
                message,
            })
        };
        let dir_error = |registry: &str, e: DirError| Error::Tls {
            registry: registry.to_owned(),
            path: e.path,
            message: e.message,
        };
        let mut tls = TlsMaterial {
            global_roots: Vec::new(),
            registry_roots: Vec::new(),
            identities: Vec::new(),
            registry_dirs: Vec::new(),
            certs_d: Vec::new(),
            advice_root: (options.certs_dirs.first().cloned()).or_else(|| {
                (options.system_certs_dirs)
                    .then(|| PathBuf::from(crate::certs_d::SYSTEM_CERTS_DIRS[1]))
            }),
        };
        for (registry, dir) in &options.registry_certs_dirs {
            let files = crate::certs_d::read_host_dir(dir).map_err(|e| dir_error(registry, e))?;
            tls.registry_dirs.push((registry.clone(), files));
        }
        for root in &options.certs_dirs {
            tls.certs_d
                .extend(crate::certs_d::read_root(root).map_err(|e| dir_error("*", e))?);
        }
        if options.system_certs_dirs {
            for root in crate::certs_d::SYSTEM_CERTS_DIRS {
                match crate::certs_d::read_root(std::path::Path::new(root)) {
                    Ok(hosts) => tls.certs_d.extend(hosts),
                    // Not named by the user: most machines and images have neither.
                    Err(e) => tracing::debug!(path = root, error = %e.message, "no certs.d"),
                }
            }
        }
        for path in &options.ca_certificates {
            tls.global_roots.extend(parse_roots("*", path)?);
        }
        for (registry, path) in &options.registry_certificates {
            for cert in parse_roots(registry, path)? {
                tls.registry_roots.push((registry.clone(), cert));
            }
        }
        for (registry, client_cert) in &options.registry_client_certificates {
            let unusable = |e: String| Error::Tls {
                registry: registry.clone(),
                path: client_cert.certificate.clone(),
                message: format!(
                    "certificate and key {} are not a usable pair: {e}",
                    client_cert.key.display(),
                ),
            };
            let certificate = read_pem(registry, &client_cert.certificate)?;
            let key = read_pem(registry, &client_cert.key)?;
            let identity = Identity::from_pem(&certificate, &key).map_err(unusable)?;
            identity.check().map_err(unusable)?;
            tls.identities.push((registry.clone(), identity));
        }
        let transfers = Arc::new(Semaphore::new(options.max_concurrent_transfers.max(1)));
        Ok(Inner {
            options,
            clock,
            tls,
            endpoints: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            token_fetches: Mutex::new(HashMap::new()),
            transfers,
        })
    }

    /// A place among the blob transfers allowed to run at once, held until dropped.
    pub async fn transfer_permit(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.transfers
            .clone()
            .acquire_owned()
            .await
            .expect("the transfer semaphore is never closed")
    }

    /// The endpoint for `registry` in direction `access`, made on first use.
    pub fn endpoint(&self, registry: &str, access: Access) -> Result<Arc<Endpoint>, Error> {
        let profile = self.options.profile(registry, access);
        let key = (registry.to_owned(), profile);
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = endpoints.get(&key) {
            return Ok(found.clone());
        }
        let client_auth_requested = Arc::new(AtomicBool::new(false));
        let (http, notes) = self.http_client(registry, profile, &client_auth_requested)?;
        let endpoint = Arc::new(Endpoint {
            registry: registry.to_owned(),
            host: api_host(registry),
            profile,
            http,
            client_auth_requested,
            client_certificate: notes.client_certificate,
            certs_dir: notes.certs_dir,
            base: OnceCell::new(),
            ping_turn: tokio::sync::Mutex::new(()),
            ping_failures: Mutex::new((0, None)),
            challenge: Mutex::new(None),
            credential: OnceCell::new(),
        });
        endpoints.insert(key, endpoint.clone());
        Ok(endpoint)
    }

    fn http_client(
        &self,
        registry: &str,
        profile: Profile,
        client_auth_requested: &Arc<AtomicBool>,
    ) -> Result<(reqwest::Client, TlsNotes), Error> {
        let same = |r: &String| crate::options::same_registry(r, registry);
        let mut builder = reqwest::Client::builder()
            .user_agent(self.options.user_agent.clone())
            .connect_timeout(self.options.connect_timeout);
        if let Some(deadline) = self.options.request_deadline {
            builder = builder.timeout(deadline);
        }
        let dir_files = self.tls.dir_files(registry)?;
        let certs_dir = match dir_files.first() {
            Some(files) => Some(files.dir.clone()),
            None => self
                .tls
                .advice_root
                .as_ref()
                .map(|root| root.join(registry)),
        };
        let identity = (self.tls.identities.iter())
            .find(|(r, _)| same(r))
            .map(|(_, identity)| identity)
            .or_else(|| dir_files.iter().find_map(|files| files.identity.as_ref()));
        let notes = TlsNotes {
            client_certificate: identity.map(Identity::describe),
            certs_dir: certs_dir.clone(),
        };
        let tls = crate::tls::client_config(crate::tls::Settings {
            advice: crate::certificate::TrustAdvice {
                registry: registry.to_owned(),
                certs_dir,
            },
            skip_verify: profile.skip_verify,
            system_roots: self.options.system_ca_certificates,
            extra_roots: (self.tls.global_roots.iter())
                .chain(
                    self.tls
                        .registry_roots
                        .iter()
                        .filter(|(r, _)| same(r))
                        .map(|(_, c)| c),
                )
                .chain(dir_files.iter().flat_map(|files| &files.cas))
                .cloned()
                .collect(),
            // A client certificate given by flag wins over one found in a directory.
            identity,
            client_auth_requested: client_auth_requested.clone(),
        })
        .map_err(|message| Error::Tls {
            registry: registry.to_owned(),
            path: Default::default(),
            message,
        })?;
        builder = builder.use_preconfigured_tls(tls);
        let http = builder.build().map_err(|e| Error::Tls {
            registry: registry.to_owned(),
            path: Default::default(),
            message: error_chain(&e),
        })?;
        Ok((http, notes))
    }

    /// The base URL (`https://host/` or `http://host/`), found by pinging `/v2/` once. Callers
    /// that arrive while a ping runs share its outcome, a failure included: a registry that
    /// does not answer costs one retry budget per wave of callers, not one per caller (the
    /// layer cache's lookups and writes behind a warm-up ping, say). A caller that comes
    /// after a failure pings again.
    pub async fn base_url(&self, ep: &Endpoint) -> Result<Url, Error> {
        if let Some(base) = ep.base.get() {
            return Ok(base.clone());
        }
        let failures_before = ep.ping_failures.lock().unwrap_or_else(|p| p.into_inner()).0;
        let _turn = ep.ping_turn.lock().await;
        if let Some(base) = ep.base.get() {
            return Ok(base.clone());
        }
        {
            let (failures, last) = &*ep.ping_failures.lock().unwrap_or_else(|p| p.into_inner());
            if *failures != failures_before {
                if let Some(shared) = last.as_ref().and_then(Error::duplicate) {
                    return Err(shared);
                }
            }
        }
        match self.ping(ep).await {
            Ok(base) => {
                let _ = ep.base.set(base.clone());
                Ok(base)
            }
            Err(e) => {
                let e = ep.explain_client_auth(e);
                let mut failures = ep.ping_failures.lock().unwrap_or_else(|p| p.into_inner());
                failures.0 += 1;
                failures.1 = e.duplicate();
                Err(e)
            }
        }
    }

    async fn ping(&self, ep: &Endpoint) -> Result<Url, Error> {
        let ctx = Ctx {
            target: &ep.registry,
            operation: Operation::Ping,
        };
        let attempt = |scheme: &'static str, retries: u32| async move {
            let base = Url::parse(&format!("{scheme}://{}/", ep.host))
                .map_err(|e| Error::InvalidArgument(format!("registry {}: {e}", ep.registry)))?;
            let ping_url = base.join("v2/").expect("static path joins");
            let resp = self
                .retrying(ctx, retries, || Some(ep.http.get(ping_url.clone())))
                .await?;
            Ok::<_, Error>((base, resp))
        };
        if !ep.profile.allow_http {
            let (base, resp) = attempt("https", self.options.retries).await?;
            return self.pinged(ep, ctx, base, resp, None).await;
        }
        // Both schemes at once, as go-containerregistry does for insecure registries: a
        // plain-HTTP registry fails the HTTPS handshake at once, and waiting for that before
        // asking over HTTP would add a round trip to every build. HTTPS wins when both answer.
        // The HTTPS attempt is not retried: a plain-HTTP registry answers every retry with the
        // same handshake failure.
        let https = std::pin::pin!(attempt("https", 0));
        let http = std::pin::pin!(attempt("http", self.options.retries));
        let (https_result, http) = match futures::future::select(https, http).await {
            futures::future::Either::Left((https_result, http)) => (https_result, Some(http)),
            futures::future::Either::Right((http_result, https)) => {
                let https_result = https.await;
                if !matches!(https_result, Err(Error::Transport { .. })) {
                    return self.https_pinged(ep, ctx, https_result).await;
                }
                return self
                    .http_pinged(ep, ctx, http_result, https_result.err())
                    .await;
            }
        };
        match (https_result, http) {
            (Err(https_failure @ Error::Transport { .. }), Some(http)) => {
                self.http_pinged(ep, ctx, http.await, Some(https_failure))
                    .await
            }
            (https_result, _) => self.https_pinged(ep, ctx, https_result).await,
        }
    }

    async fn https_pinged(
        &self,
        ep: &Endpoint,
        ctx: Ctx<'_>,
        result: Result<(Url, Response), Error>,
    ) -> Result<Url, Error> {
        let (base, resp) = result?;
        self.pinged(ep, ctx, base, resp, None).await
    }

    /// The plain-HTTP ping's outcome, with the HTTPS failure that led to it in any error.
    async fn http_pinged(
        &self,
        ep: &Endpoint,
        ctx: Ctx<'_>,
        result: Result<(Url, Response), Error>,
        https_failure: Option<Error>,
    ) -> Result<Url, Error> {
        let https = https_failure.map(|e| e.to_string()).unwrap_or_default();
        match result {
            Ok((base, resp)) => {
                tracing::info!(registry = %ep.registry, error = %https, "HTTPS failed, using plain HTTP");
                self.pinged(ep, ctx, base, resp, Some(https)).await
            }
            Err(Error::Transport {
                target,
                operation,
                message,
                connect,
            }) => Err(Error::Transport {
                target,
                operation,
                message: format!("{message} (and over HTTPS: {https})"),
                connect,
            }),
            Err(err) => Err(err),
        }
    }

    /// Takes a ping's answer: 200 or 401 make `base` the registry's base URL and record its
    /// challenge; any other status is the registry's error.
    async fn pinged(
        &self,
        ep: &Endpoint,
        ctx: Ctx<'_>,
        base: Url,
        resp: Response,
        https_failure: Option<String>,
    ) -> Result<Url, Error> {
        let status = resp.status();
        if status.is_success() || status == StatusCode::UNAUTHORIZED {
            let challenge = challenge_of(&resp);
            tracing::debug!(registry = %ep.registry, %base, ?challenge, "registry pinged");
            *ep.challenge.lock().unwrap_or_else(|p| p.into_inner()) = challenge;
            return Ok(base);
        }
        let err = status_error(resp, ctx).await;
        Err(match https_failure {
            // A TLS port answers plain HTTP with 400: the HTTPS failure is the news.
            Some(https) => Error::Transport {
                target: ep.registry.clone(),
                operation: Operation::Ping,
                message: format!("over HTTPS: {https}; over plain HTTP: {err}"),
                connect: true,
            },
            None => err,
        })
    }

    /// Sends a request with authentication and retries. `make` builds the request each try;
    /// it returns `None` when the body cannot be sent again, and the last failure is returned.
    /// Any status that is not retried (or ran out of retries) is returned as `Ok`; the caller
    /// decides which statuses are success.
    pub async fn send(
        &self,
        ep: &Endpoint,
        ctx: Ctx<'_>,
        scopes: &[String],
        mut make: impl FnMut(&reqwest::Client) -> Option<RequestBuilder>,
    ) -> Result<Response, Error> {
        let mut attempt: u32 = 0;
        let mut reauthenticated = false;
        let mut last: Option<Result<Response, Error>> = None;
        loop {
            let authorization = self.authorization(ep, ctx, scopes).await?;
            let Some(mut request) = make(&ep.http) else {
                return last.unwrap_or_else(|| {
                    Err(Error::invalid(
                        ctx.target,
                        ctx.operation,
                        "request body could not be created",
                    ))
                });
            };
            if let Some(value) = authorization {
                request = request.header(AUTHORIZATION, value);
            }
            match self.dispatch(request, ctx).await {
                Err(err) => {
                    // A refused certificate is refused again on every try.
                    if attempt >= self.options.retries || matches!(err, Error::Certificate { .. }) {
                        return Err(err);
                    }
                    let delay = self.backoff(attempt);
                    self.retry_note(ctx, failure_reason(&err), attempt, delay);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                    last = Some(Err(err));
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !reauthenticated => {
                    reauthenticated = true;
                    match challenge_of(&resp) {
                        Some(challenge) => {
                            tracing::debug!(registry = %ep.registry, ?challenge, "authentication challenge");
                            *ep.challenge.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(challenge);
                            self.forget_token(ep, scopes);
                            last = Some(Ok(resp));
                        }
                        None => return Ok(resp),
                    }
                }
                Ok(resp) if retryable_status(resp.status()) && attempt < self.options.retries => {
                    let delay = retry_after(&resp)
                        .map(|d| d.min(self.options.retry_max_delay))
                        .unwrap_or_else(|| self.backoff(attempt));
                    self.retry_note(ctx, status_reason(&resp), attempt, delay);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                    last = Some(Ok(resp));
                }
                Ok(resp) => return Ok(resp),
            }
        }
    }

    /// Retries without authentication, for the ping and the token request.
    async fn retrying(
        &self,
        ctx: Ctx<'_>,
        retries: u32,
        mut make: impl FnMut() -> Option<RequestBuilder>,
    ) -> Result<Response, Error> {
        let mut attempt = 0;
        loop {
            let Some(request) = make() else {
                return Err(Error::invalid(
                    ctx.target,
                    ctx.operation,
                    "request could not be created",
                ));
            };
            match self.dispatch(request, ctx).await {
                Err(err) if attempt < retries && !matches!(err, Error::Certificate { .. }) => {
                    let delay = self.backoff(attempt);
                    self.retry_note(ctx, failure_reason(&err), attempt, delay);
                    tokio::time::sleep(delay).await;
                }
                Err(err) => return Err(err),
                Ok(resp) if retryable_status(resp.status()) && attempt < retries => {
                    let delay = retry_after(&resp)
                        .map(|d| d.min(self.options.retry_max_delay))
                        .unwrap_or_else(|| self.backoff(attempt));
                    self.retry_note(ctx, status_reason(&resp), attempt, delay);
                    tokio::time::sleep(delay).await;
                }
                Ok(resp) => return Ok(resp),
            }
            attempt += 1;
        }
    }

    /// The wait before retry `attempt` (from 0): the back-off ceiling with up to half of it
    /// cut at random, so that builds that failed together do not all come back at once.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.backoff_ceiling(attempt)
            .mul_f64(1.0 - random_fraction() / 2.0)
    }

    /// The longest wait before retry `attempt`: the first delay doubled with each retry, up to
    /// the cap.
    fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(16));
        self.options
            .retry_initial_delay
            .saturating_mul(factor)
            .min(self.options.retry_max_delay)
    }

    /// Tells the log and the retry hook that try `attempt` (from 0) failed for `reason` and
    /// the next goes out after `delay`.
    pub fn retry_note(&self, ctx: Ctx<'_>, reason: String, attempt: u32, delay: Duration) {
        let retry = crate::options::Retry {
            target: ctx.target.to_owned(),
            operation: ctx.operation,
            reason,
            attempt: attempt + 1,
            retries: self.options.retries,
            delay,
        };
        tracing::warn!("retrying: {retry}");
        if let Some(hook) = &self.options.on_retry {
            hook.call(&retry);
        }
    }

    /// Sends one try of a request, failing it when nothing moves for the stall timeout: no
    /// slice of its body sent and no answer for that long.
    async fn dispatch(&self, request: RequestBuilder, ctx: Ctx<'_>) -> Result<Response, Error> {
        let (http, request) = request.build_split();
        let mut request = request.map_err(|e| Error::transport(ctx.target, ctx.operation, &e))?;
        let progress = watch::Progress::new();
        if let Some(body) = request.body_mut().take() {
            *request.body_mut() = Some(watch::watched(body, progress.clone()));
        }
        let described = format!("{} {}", request.method(), request.url());
        let stall = self.options.stall_timeout;
        match watch::unless_stalled(&progress, stall, http.execute(request)).await {
            Some(Ok(mut resp)) => {
                if let Some(stall) = stall {
                    resp.extensions_mut().insert(StallTimeout(stall));
                }
                Ok(resp)
            }
            Some(Err(e)) => Err(Error::transport(ctx.target, ctx.operation, &e)),
            None => Err(Error::Transport {
                target: ctx.target.to_owned(),
                operation: ctx.operation,
                message: format!(
                    "{described}: nothing moved for {} (the stall timeout)",
                    seconds(stall.unwrap_or_default())
                ),
                connect: false,
            }),
        }
    }
}

impl Endpoint {
    /// A failed ping explained, when the registry asked for a client certificate: a server
    /// that demands one and does not like what it got just closes the connection, which
    /// alone says nothing to the user.
    fn explain_client_auth(&self, error: Error) -> Error {
        if !self.client_auth_requested.load(Ordering::Relaxed) {
            return error;
        }
        let registry = &self.registry;
        match (error, &self.client_certificate) {
            (
                Error::Transport {
                    target,
                    operation,
                    message,
                    ..
                },
                None,
            ) => Error::Certificate {
                target,
                operation,
                reason: format!(
                    "the registry asks for a TLS client certificate and none is configured for {registry}: give one with --registry-client-cert {registry}=CERT,KEY{} (the connection failed: {message})",
                    match &self.certs_dir {
                        Some(dir) => format!(", or as NAME.cert and NAME.key in {}/", dir.display()),
                        None => String::new(),
                    }
                ),
            },
            (
                Error::Transport {
                    target,
                    operation,
                    message,
                    connect,
                },
                Some(presented),
            ) => Error::Transport {
                target,
                operation,
                message: format!(
                    "{message} (the registry asked for a TLS client certificate and was given {presented}; check that the registry trusts its issuer)"
                ),
                connect,
            },
            (other, _) => other,
        }
    }

    /// The target as written in errors for a repository on this endpoint.
    pub fn target(&self, repository: &str) -> String {
        format!("{}/{}", self.registry, repository)
    }
}

fn challenge_of(resp: &Response) -> Option<Challenge> {
    Challenge::from_headers(
        resp.headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// `Retry-After` as delay-seconds or as an HTTP date (RFC 9110).
fn retry_after(resp: &Response) -> Option<Duration> {
    let value = resp.headers().get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = parse_http_date(value)?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The stall timeout a response was sent under, kept with it so that whoever reads its body
/// holds every chunk to the same bound.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StallTimeout(pub Duration);

/// The stall timeout that applies to reading `resp`'s body.
pub(crate) fn stall_of(resp: &Response) -> Option<Duration> {
    resp.extensions().get::<StallTimeout>().map(|s| s.0)
}

/// The longest an error's body is waited for: the error is the news, its body only explains it,
/// so a body that trickles or stops must not hold the failure up.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(10);

/// Turns an unexpected response into an error with the registry's code and message.
pub(crate) async fn status_error(resp: Response, ctx: Ctx<'_>) -> Error {
    let status = resp.status();
    let wait = stall_of(&resp).map_or(ERROR_BODY_WAIT, |stall| stall.min(ERROR_BODY_WAIT));
    let body = tokio::time::timeout(wait, read_limited(resp, ERROR_BODY_LIMIT, ctx))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|b| parse_error_body(&b));
    Error::Status {
        target: ctx.target.to_owned(),
        operation: ctx.operation,
        status,
        body,
    }
}

/// Reads a response body, failing if it is longer than `limit` (manifests, token answers and
/// error bodies are small; anything bigger is not what was asked for).
pub(crate) async fn read_limited(
    mut resp: Response,
    limit: usize,
    ctx: Ctx<'_>,
) -> Result<bytes::Bytes, Error> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(Error::invalid(
            ctx.target,
            ctx.operation,
            format!("body larger than {limit} bytes"),
        ));
    }
    let mut body = bytes::BytesMut::new();
    let stall = stall_of(&resp);
    let url = resp.url().clone();
    loop {
        let Some(next) = watch::within(stall, resp.chunk()).await else {
            return Err(body_stalled(ctx, &url, stall.unwrap_or_default()));
        };
        let Some(chunk) = next.map_err(|e| Error::transport(ctx.target, ctx.operation, &e))? else {
            break;
        };
        if body.len() + chunk.len() > limit {
            return Err(Error::invalid(
                ctx.target,
                ctx.operation,
                format!("body larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The error of an answer whose body stopped arriving.
pub(crate) fn body_stalled(ctx: Ctx<'_>, url: &Url, stall: Duration) -> Error {
    Error::Transport {
        target: ctx.target.to_owned(),
        operation: ctx.operation,
        message: format!(
            "{url}: the answer's body stopped: nothing arrived for {} (the stall timeout)",
            seconds(stall)
        ),
        connect: false,
    }
}

/// What went wrong with a try, for a retry note: the cause without the target and operation
/// the note already names.
fn failure_reason(err: &Error) -> String {
    match err {
        Error::Transport { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// A retried status, for a retry note: the URL, the status and any `Retry-After`.
fn status_reason(resp: &Response) -> String {
    let mut reason = format!("{} answered {}", resp.url(), resp.status());
    if let Some(value) = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
    {
        reason.push_str(&format!(" (Retry-After: {value})"));
    }
    reason
}

/// A duration as people read it in an error: `2s`, `1.5s`.
pub(crate) fn seconds(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

/// A number in [0, 1) that differs from call to call; std's hasher keys are random per process
/// and advance with each `RandomState`, which is all the spread a back-off needs.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let inner = Inner::new(
            RegistryOptions {
                retry_initial_delay: Duration::from_millis(100),
                retry_max_delay: Duration::from_millis(350),
                ..RegistryOptions::default()
            },
            Arc::new(crate::clock::SystemClock),
        )
        .unwrap();
        assert_eq!(inner.backoff_ceiling(0), Duration::from_millis(100));
        assert_eq!(inner.backoff_ceiling(1), Duration::from_millis(200));
        assert_eq!(inner.backoff_ceiling(2), Duration::from_millis(350));
        assert_eq!(inner.backoff_ceiling(40), Duration::from_millis(350));
    }

    #[test]
    fn backoff_is_cut_at_random_by_at_most_half() {
        let inner = Inner::new(
            RegistryOptions {
                retry_initial_delay: Duration::from_millis(1000),
                ..RegistryOptions::default()
            },
            Arc::new(crate::clock::SystemClock),
        )
        .unwrap();
        let waits: Vec<Duration> = (0..200).map(|_| inner.backoff(0)).collect();
        assert!(waits
            .iter()
            .all(|w| *w > Duration::from_millis(500) && *w <= Duration::from_millis(1000)));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(
            distinct.len() > 150,
            "{} distinct waits of 200",
            distinct.len()
        );
    }
}

//! The HTTP layer under [`Client`](crate::Client): one reqwest client per registry and
//! transport profile, scheme discovery with the plain-HTTP fallback, the authentication
//! challenge and token cache, and the retry loop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use reqwest::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use tokio::sync::{OnceCell, Semaphore};
use url::Url;

use crate::certs_d::{DirError, HostDir, HostFiles};
use crate::challenge::Challenge;
use crate::credentials::Credential;
use crate::error::{error_chain, parse_error_body, retryable_status, Error, Operation};
use crate::options::{api_host, Access, Profile, RegistryOptions};
use crate::secret::Secret;
use crate::tls::Identity;

/// The most of an error body Kiln reads to report the registry's message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Shared state behind every clone of a `Client`.
pub(crate) struct Inner {
    pub options: RegistryOptions,
    tls: TlsMaterial,
    endpoints: Mutex<HashMap<(String, Profile), Arc<Endpoint>>>,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
    token_fetches: Mutex<HashMap<TokenKey, Arc<tokio::sync::Mutex<()>>>>,
    transfers: Arc<Semaphore>,
}

/// A token cache key: API host and the space-joined scopes.
type TokenKey = (String, String);

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

struct CachedToken {
    value: Secret,
    expires: Instant,
}

/// What a request is for, to label errors.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub target: &'a str,
    pub operation: Operation,
}

impl Inner {
    pub fn new(options: RegistryOptions) -> Result<Self, Error> {
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
        if let Some(timeout) = self.options.read_timeout {
            builder = builder.read_timeout(timeout);
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
            match request.send().await {
                Err(e) => {
                    let err = Error::transport(ctx.target, ctx.operation, &e);
                    // A refused certificate is refused again on every try.
                    if attempt >= self.options.retries || matches!(err, Error::Certificate { .. }) {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, attempt, "retrying");
                    tokio::time::sleep(self.backoff(attempt)).await;
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
                    tracing::warn!(target = ctx.target, status = %resp.status(), ?delay, attempt, "retrying");
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
            match request.send().await {
                Err(e) if attempt < retries && crate::certificate::find_rejection(&e).is_none() => {
                    tracing::warn!(target = ctx.target, error = %error_chain(&e), attempt, "retrying");
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                Err(e) => return Err(Error::transport(ctx.target, ctx.operation, &e)),
                Ok(resp) if retryable_status(resp.status()) && attempt < retries => {
                    let delay = retry_after(&resp)
                        .map(|d| d.min(self.options.retry_max_delay))
                        .unwrap_or_else(|| self.backoff(attempt));
                    tokio::time::sleep(delay).await;
                }
                Ok(resp) => return Ok(resp),
            }
            attempt += 1;
        }
    }

    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(16));
        self.options
            .retry_initial_delay
            .saturating_mul(factor)
            .min(self.options.retry_max_delay)
    }

    async fn credential(&self, ep: &Endpoint) -> Result<Option<Credential>, Error> {
        ep.credential
            .get_or_try_init(|| self.options.keychain.credential_for(&ep.registry))
            .await
            .cloned()
    }

    /// The `Authorization` header for a request needing `scopes`, per the last challenge.
    async fn authorization(
        &self,
        ep: &Endpoint,
        ctx: Ctx<'_>,
        scopes: &[String],
    ) -> Result<Option<HeaderValue>, Error> {
        let challenge = ep
            .challenge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic { .. }) => match self.credential(ep).await? {
                Some(Credential::Basic { username, password }) => {
                    Ok(Some(basic_header(&username, &password)))
                }
                _ => Ok(None),
            },
            Some(Challenge::Bearer { realm, service, .. }) => {
                let credential = self.credential(ep).await?;
                if let Some(Credential::RegistryToken(token)) = &credential {
                    return Ok(Some(bearer_header(token)));
                }
                let key = (ep.host.clone(), scopes.join(" "));
                if let Some(header) = self.cached_token(&key) {
                    return Ok(Some(header));
                }
                // One fetch per scope at a time: parallel layer pushes share the first token
                // instead of each asking the token server.
                let fetch_lock = self
                    .token_fetches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(key.clone())
                    .or_default()
                    .clone();
                let _fetching = fetch_lock.lock().await;
                if let Some(header) = self.cached_token(&key) {
                    return Ok(Some(header));
                }
                let token = self
                    .fetch_token(
                        ep,
                        ctx,
                        &realm,
                        service.as_deref(),
                        scopes,
                        credential.as_ref(),
                    )
                    .await?;
                let header = bearer_header(&token.value);
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, token);
                Ok(Some(header))
            }
        }
    }

    fn cached_token(&self, key: &TokenKey) -> Option<HeaderValue> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .filter(|t| t.expires > Instant::now())
            .map(|t| bearer_header(&t.value))
    }

    fn forget_token(&self, ep: &Endpoint, scopes: &[String]) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ep.host.clone(), scopes.join(" ")));
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        ctx: Ctx<'_>,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        credential: Option<&Credential>,
    ) -> Result<CachedToken, Error> {
        let ctx = Ctx {
            target: ctx.target,
            operation: Operation::Token,
        };
        let realm_url = Url::parse(realm).map_err(|e| {
            Error::invalid(ctx.target, ctx.operation, format!("realm {realm:?}: {e}"))
        })?;
        let requested_at = SystemTime::now();
        let resp = match credential {
            Some(Credential::IdentityToken { token, .. }) => {
                let mut form: Vec<(&str, String)> = vec![
                    ("grant_type", "refresh_token".to_owned()),
                    ("refresh_token", token.expose().to_owned()),
                    ("client_id", "kiln".to_owned()),
                ];
                if let Some(service) = service {
                    form.push(("service", service.to_owned()));
                }
                if !scopes.is_empty() {
                    form.push(("scope", scopes.join(" ")));
                }
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
                    .finish();
                self.retrying(ctx, self.options.retries, || {
                    Some(
                        ep.http
                            .post(realm_url.clone())
                            .header(
                                reqwest::header::CONTENT_TYPE,
                                "application/x-www-form-urlencoded",
                            )
                            .body(body.clone()),
                    )
                })
                .await?
            }
            _ => {
                let mut url = realm_url.clone();
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    for scope in scopes {
                        query.append_pair("scope", scope);
                    }
                }
                let basic = match credential {
                    Some(Credential::Basic { username, password }) => {
                        Some(basic_header(username, password))
                    }
                    _ => None,
                };
                self.retrying(ctx, self.options.retries, || {
                    let request = ep.http.get(url.clone());
                    Some(match &basic {
                        Some(value) => request.header(AUTHORIZATION, value.clone()),
                        None => request,
                    })
                })
                .await?
            }
        };
        if !resp.status().is_success() {
            return Err(status_error(resp, ctx).await);
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
            #[serde(default)]
            issued_at: Option<String>,
        }
        let body = read_limited(resp, ERROR_BODY_LIMIT, ctx).await?;
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            Error::invalid(
                ctx.target,
                ctx.operation,
                format!("token answer is not JSON ({:?} error)", e.classify()),
            )
        })?;
        let value = answer
            .access_token
            .filter(|t| !t.is_empty())
            .or(answer.token.filter(|t| !t.is_empty()))
            .ok_or_else(|| {
                Error::invalid(ctx.target, ctx.operation, "the answer holds no token")
            })?;
        // The spec's minimum lifetime is 60 s when the server does not say.
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(60).max(1));
        let issued = answer
            .issued_at
            .as_deref()
            .and_then(parse_rfc3339)
            .filter(|t| *t <= SystemTime::now() + Duration::from_secs(300))
            .unwrap_or(requested_at);
        let valid_until = issued + lifetime;
        let remaining = valid_until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        // Renew a little early so a token does not expire between the check and its use.
        let margin = (lifetime / 10).min(Duration::from_secs(10));
        Ok(CachedToken {
            value: Secret::new(value),
            expires: Instant::now() + remaining.saturating_sub(margin),
        })
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

fn basic_header(username: &str, password: &Secret) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{username}:{}", password.expose()));
    sensitive(format!("Basic {encoded}"))
}

fn bearer_header(token: &Secret) -> HeaderValue {
    sensitive(format!("Bearer {}", token.expose()))
}

/// Header values marked sensitive are left out of reqwest's and hyper's debug output.
fn sensitive(value: String) -> HeaderValue {
    let mut header =
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("Invalid"));
    header.set_sensitive(true);
    header
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

/// Parses the IMF-fixdate form, `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(text: &str) -> Option<SystemTime> {
    let (_, rest) = text.split_once(", ")?;
    let mut parts = rest.split(' ');
    let day: i64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || time.len() != 8 {
        return None;
    }
    parse_rfc3339(&format!("{year:04}-{month:02}-{day:02}T{time}Z"))
}

/// Turns an unexpected response into an error with the registry's code and message.
pub(crate) async fn status_error(resp: Response, ctx: Ctx<'_>) -> Error {
    let status = resp.status();
    let body = read_limited(resp, ERROR_BODY_LIMIT, ctx)
        .await
        .ok()
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
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::transport(ctx.target, ctx.operation, &e))?
    {
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

/// Parses the RFC 3339 timestamps token servers put in `issued_at`
/// (`2024-01-02T03:04:05.678Z`, `...+02:00`).
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> { text.get(range)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    // Days from civil date (proleptic Gregorian), after Howard Hinnant's well-known formula.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(secs)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_timestamps() {
        let t = parse_rfc3339("2024-01-02T03:04:05Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_704_164_645
        );
        let with_offset = parse_rfc3339("2024-01-02T05:04:05.123456+02:00").unwrap();
        assert_eq!(with_offset, t);
        assert!(parse_rfc3339("yesterday").is_none());
        assert_eq!(parse_http_date("Tue, 02 Jan 2024 03:04:05 GMT"), Some(t));
        assert!(parse_http_date("Tue, 02 Foo 2024 03:04:05 GMT").is_none());
        assert!(parse_http_date("2 hours").is_none());
        assert!(parse_rfc3339("2024-13-02T03:04:05Z").is_none());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let inner = Inner::new(RegistryOptions {
            retry_initial_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_millis(350),
            ..RegistryOptions::default()
        })
        .unwrap();
        assert_eq!(inner.backoff(0), Duration::from_millis(100));
        assert_eq!(inner.backoff(1), Duration::from_millis(200));
        assert_eq!(inner.backoff(2), Duration::from_millis(350));
        assert_eq!(inner.backoff(40), Duration::from_millis(350));
    }

    #[test]
    fn auth_headers_are_sensitive() {
        let h = basic_header("user", &Secret::new("pw"));
        assert!(h.is_sensitive());
        assert_eq!(h.to_str().unwrap(), "Basic dXNlcjpwdw==");
        assert!(!format!("{h:?}").contains("dXNlcjpwdw"));
    }
}

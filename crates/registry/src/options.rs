//! Client configuration, shaped after kaniko's registry flags so the executor can fill it
//! directly from the command line.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::credentials::{normalize_registry, Keychain};
use crate::error::{Error, Operation};

/// A client certificate and its private key (PEM files), for registries that require mutual
/// TLS (`--registry-client-cert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The certificate (chain) PEM file.
    pub certificate: PathBuf,
    /// The private key PEM file (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How blobs are uploaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UploadMode {
    /// One `PUT` when the digest and size are known up front, chunks otherwise.
    #[default]
    Auto,
    /// Always `PATCH` in chunks of [`RegistryOptions::chunk_size`], then `PUT`.
    Chunked,
}

/// Everything that shapes how a [`Client`](crate::Client) talks to registries.
///
/// Registry names in the per-registry lists are hosts with an optional port
/// (`my.registry:5000`); `docker.io`, `index.docker.io` and `registry-1.docker.io` are the
/// same registry.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Where credentials come from (the mounted docker config and credential helpers).
    pub keychain: Keychain,
    /// `--insecure`: registries pushed to may be reached over plain HTTP.
    pub insecure: bool,
    /// `--insecure-pull`: registries pulled from may be reached over plain HTTP.
    pub insecure_pull: bool,
    /// `--insecure-registry`: registries that may be reached over plain HTTP for any access.
    pub insecure_registries: Vec<String>,
    /// `--skip-tls-verify`: don't verify certificates of registries pushed to.
    pub skip_tls_verify: bool,
    /// `--skip-tls-verify-pull`: don't verify certificates of registries pulled from.
    pub skip_tls_verify_pull: bool,
    /// `--skip-tls-verify-registry`: registries whose certificates are never verified.
    pub skip_tls_verify_registries: Vec<String>,
    /// CA certificates (PEM files) trusted for every registry, on top of the built-in roots.
    pub ca_certificates: Vec<PathBuf>,
    /// Also trust the system's CA certificates the way Go programs such as kaniko find them:
    /// `SSL_CERT_FILE` (or the distribution's bundle, e.g. `/etc/ssl/certs/ca-certificates.crt`)
    /// and the PEM files in the `SSL_CERT_DIR` directories. This is how a Pod adds a private
    /// CA without flags. The built-in Mozilla roots are always trusted.
    pub system_ca_certificates: bool,
    /// `--registry-certificate REGISTRY=PATH`: extra CA certificates for one registry.
    pub registry_certificates: Vec<(String, PathBuf)>,
    /// `--registry-client-cert REGISTRY=CERT,KEY`: client certificates per registry. One
    /// given here wins over one found in a certificate directory.
    pub registry_client_certificates: Vec<(String, ClientCertificate)>,
    /// `--registry-certs-dir DIR`: certs.d directories laid out as Docker's
    /// `/etc/docker/certs.d`, one `HOST[:PORT]` directory per registry holding `*.crt` (CA
    /// certificates, or the server's own), `NAME.cert` and `NAME.key` (a client
    /// certificate). Searched in order, before the system ones; the first directory named
    /// after the registry is the one used. Each must exist.
    pub certs_dirs: Vec<PathBuf>,
    /// `--registry-certs-dir REGISTRY=DIR`: one registry's certificate files directly in
    /// `DIR` (a Secret mounted for that registry, as skopeo's `--cert-dir`); for that
    /// registry no certs.d directory is searched.
    pub registry_certs_dirs: Vec<(String, PathBuf)>,
    /// Also search the certs.d directories Docker and podman read: `/etc/containers/certs.d`,
    /// then `/etc/docker/certs.d`.
    pub system_certs_dirs: bool,
    /// `--registry-mirror`: pull-through mirrors tried, in order, before Docker Hub. Each is
    /// a host with an optional path prefix (`mirror.example/dockerhub`).
    pub registry_mirrors: Vec<String>,
    /// `--registry-map ORIGINAL=MIRROR;MIRROR2`: mirrors tried before any registry.
    pub registry_maps: Vec<(String, Vec<String>)>,
    /// `--skip-default-registry-fallback`: when mirrors are configured, never fall back to
    /// the original registry.
    pub skip_default_registry_fallback: bool,
    /// How many times a failed request is tried again (connection errors, 429, 5xx).
    pub retries: u32,
    /// The first back-off delay; it doubles with each retry up to `retry_max_delay`.
    pub retry_initial_delay: Duration,
    /// The longest wait between two tries, also the cap on a registry's `Retry-After`.
    pub retry_max_delay: Duration,
    /// How many blob transfers (pulls and pushes together) may run at once.
    pub max_concurrent_transfers: usize,
    /// Size of one `PATCH` of a chunked upload. Each running chunked upload buffers one
    /// chunk in memory so that it can be re-sent after a failure.
    pub chunk_size: usize,
    /// How blobs are uploaded.
    pub upload_mode: UploadMode,
    /// Time allowed to open a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// `--registry-stall-timeout`: the longest time a request may go without a byte moving in
    /// either direction (a slice of the body sent, the answer's headers, a chunk of its body).
    /// A transfer that keeps moving is never cut by it, however long it takes. A stalled try
    /// fails and is retried like a broken connection. `None` waits forever.
    pub stall_timeout: Option<Duration>,
    /// `--registry-request-deadline`: the longest one try of one request may take, body
    /// included, moving or not, so that a trickle ends too. `None` for no deadline.
    pub request_deadline: Option<Duration>,
    /// Called before every retry with what failed and when the next try goes out, so a build
    /// can show it in its progress output. Retries are also logged with `tracing`.
    pub on_retry: Option<RetryHook>,
    /// Page size asked for when listing tags; `None` lets the registry choose.
    pub tags_page_size: Option<u32>,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            keychain: Keychain::anonymous(),
            insecure: false,
            insecure_pull: false,
            insecure_registries: Vec::new(),
            skip_tls_verify: false,
            skip_tls_verify_pull: false,
            skip_tls_verify_registries: Vec::new(),
            ca_certificates: Vec::new(),
            system_ca_certificates: true,
            registry_certificates: Vec::new(),
            registry_client_certificates: Vec::new(),
            certs_dirs: Vec::new(),
            registry_certs_dirs: Vec::new(),
            system_certs_dirs: true,
            registry_mirrors: Vec::new(),
            registry_maps: Vec::new(),
            skip_default_registry_fallback: false,
            retries: 3,
            retry_initial_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(30),
            max_concurrent_transfers: 4,
            chunk_size: 4 * 1024 * 1024,
            upload_mode: UploadMode::Auto,
            connect_timeout: Duration::from_secs(30),
            stall_timeout: Some(Duration::from_secs(60)),
            request_deadline: Some(Duration::from_secs(3600)),
            on_retry: None,
            tags_page_size: None,
            user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// A retry about to happen, as given to [`RegistryOptions::on_retry`].
#[derive(Clone, Debug)]
pub struct Retry {
    /// `registry/repository` (or the registry alone).
    pub target: String,
    /// What was being done.
    pub operation: Operation,
    /// What went wrong with the last try: the status and the URL, or the transport failure.
    pub reason: String,
    /// Which retry this is, from 1.
    pub attempt: u32,
    /// How many retries are allowed in all.
    pub retries: u32,
    /// How long until the retry goes out.
    pub delay: Duration,
}

impl fmt::Display for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}; retry {} of {} in {:.1}s",
            self.target,
            self.operation,
            self.reason,
            self.attempt,
            self.retries,
            self.delay.as_secs_f64()
        )
    }
}

/// A function told about every retry ([`RegistryOptions::on_retry`]).
#[derive(Clone)]
pub struct RetryHook(Arc<dyn Fn(&Retry) + Send + Sync>);

impl RetryHook {
    /// Wraps `hook`.
    pub fn new(hook: impl Fn(&Retry) + Send + Sync + 'static) -> RetryHook {
        RetryHook(Arc::new(hook))
    }

    /// Tells the hook about `retry`.
    pub fn call(&self, retry: &Retry) {
        (self.0)(retry)
    }

    /// A hook that calls `self`, then `next`: an embedder's hook kept beside the engine's.
    pub fn then(self, next: Option<RetryHook>) -> RetryHook {
        match next {
            None => self,
            Some(next) => RetryHook::new(move |retry| {
                self.call(retry);
                next.call(retry);
            }),
        }
    }
}

impl fmt::Debug for RetryHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RetryHook")
    }
}

/// Whether an operation reads from or writes to a registry; kaniko's flags differ by
/// direction (`--insecure` vs `--insecure-pull`, `--skip-tls-verify` vs `-pull`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    Pull,
    Push,
}

/// The transport settings that apply to one registry for one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Profile {
    /// Try HTTPS, and on a connection or TLS failure, plain HTTP.
    pub allow_http: bool,
    pub skip_verify: bool,
}

impl RegistryOptions {
    /// Adds one `--registry-map` value: `ORIGINAL=MIRROR[;MIRROR...]`.
    pub fn add_registry_map(&mut self, flag: &str) -> Result<(), Error> {
        let (original, mirrors) = flag.split_once('=').ok_or_else(|| {
            Error::InvalidArgument(format!(
                "registry map {flag:?}: expected ORIGINAL=MIRROR[;MIRROR...]"
            ))
        })?;
        let mirrors: Vec<String> = mirrors
            .split(';')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        if original.trim().is_empty() || mirrors.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "registry map {flag:?}: expected ORIGINAL=MIRROR[;MIRROR...]"
            )));
        }
        self.registry_maps
            .push((original.trim().to_owned(), mirrors));
        Ok(())
    }

    /// Adds one `--registry-certificate` value: `REGISTRY=PATH`.
    pub fn add_registry_certificate(&mut self, flag: &str) -> Result<(), Error> {
        let (registry, path) = flag
            .split_once('=')
            .filter(|(r, p)| !r.is_empty() && !p.is_empty())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "registry certificate {flag:?}: expected REGISTRY=PATH"
                ))
            })?;
        self.registry_certificates
            .push((registry.to_owned(), PathBuf::from(path)));
        Ok(())
    }

    /// Adds one `--registry-client-cert` value: `REGISTRY=CERT_PATH,KEY_PATH`.
    pub fn add_registry_client_certificate(&mut self, flag: &str) -> Result<(), Error> {
        let bad = || {
            Error::InvalidArgument(format!(
                "registry client certificate {flag:?}: expected REGISTRY=CERT_PATH,KEY_PATH"
            ))
        };
        let (registry, paths) = flag.split_once('=').ok_or_else(bad)?;
        let (cert, key) = paths.split_once(',').ok_or_else(bad)?;
        if registry.is_empty() || cert.is_empty() || key.is_empty() {
            return Err(bad());
        }
        self.registry_client_certificates.push((
            registry.to_owned(),
            ClientCertificate {
                certificate: PathBuf::from(cert),
                key: PathBuf::from(key),
            },
        ));
        Ok(())
    }

    /// Adds one `--registry-certs-dir` value: `DIR`, a certs.d directory with a directory per
    /// registry, or `REGISTRY=DIR`, one registry's files. A value is `REGISTRY=DIR` when it
    /// has a `=` with no `/` before it (a registry name has none; a path to a certs.d
    /// directory whose name holds a `=` can be written `./NAME`).
    pub fn add_registry_certs_dir(&mut self, flag: &str) -> Result<(), Error> {
        match flag.split_once('=') {
            Some((registry, _)) if registry.contains('/') => {
                self.certs_dirs.push(PathBuf::from(flag));
            }
            Some((registry, dir)) => {
                if registry.is_empty() || dir.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "registry certs dir {flag:?}: expected DIR or REGISTRY=DIR"
                    )));
                }
                self.registry_certs_dirs
                    .push((registry.to_owned(), PathBuf::from(dir)));
            }
            None if flag.is_empty() => {
                return Err(Error::InvalidArgument(
                    "registry certs dir: expected DIR or REGISTRY=DIR, got nothing".to_owned(),
                ));
            }
            None => self.certs_dirs.push(PathBuf::from(flag)),
        }
        Ok(())
    }

    pub(crate) fn profile(&self, registry: &str, access: Access) -> Profile {
        let named = |list: &[String]| list.iter().any(|r| same_registry(r, registry));
        let allow_http = named(&self.insecure_registries)
            || is_loopback(registry)
            || match access {
                Access::Pull => self.insecure_pull,
                Access::Push => self.insecure,
            };
        let skip_verify = named(&self.skip_tls_verify_registries)
            || match access {
                Access::Pull => self.skip_tls_verify_pull,
                Access::Push => self.skip_tls_verify,
            };
        Profile {
            allow_http,
            skip_verify,
        }
    }

    /// The registries (with a repository path prefix) to try, in order, when pulling from
    /// `registry`: mapped mirrors, then Docker Hub mirrors, then the registry itself unless
    /// fallback is disabled.
    pub(crate) fn pull_sources(&self, registry: &str) -> Vec<MirrorTarget> {
        let mut out = Vec::new();
        for (original, mirrors) in &self.registry_maps {
            if same_registry(original, registry) {
                out.extend(mirrors.iter().map(|m| MirrorTarget::parse(m)));
            }
        }
        if normalize_registry(registry) == "docker.io" {
            out.extend(self.registry_mirrors.iter().map(|m| MirrorTarget::parse(m)));
        }
        if out.is_empty() || !self.skip_default_registry_fallback {
            out.push(MirrorTarget {
                registry: registry.to_owned(),
                prefix: None,
                is_mirror: false,
            });
        }
        out
    }
}

/// One place a pull may be served from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MirrorTarget {
    pub registry: String,
    /// Prepended to the repository path (`mirror.example/prefix` serves `prefix/library/x`).
    pub prefix: Option<String>,
    pub is_mirror: bool,
}

impl MirrorTarget {
    fn parse(mirror: &str) -> Self {
        let trimmed = mirror
            .strip_prefix("https://")
            .or_else(|| mirror.strip_prefix("http://"))
            .unwrap_or(mirror)
            .trim_end_matches('/');
        let (registry, prefix) = match trimmed.split_once('/') {
            Some((host, path)) if !path.is_empty() => (host, Some(path.to_owned())),
            _ => (trimmed, None),
        };
        MirrorTarget {
            registry: registry.to_owned(),
            prefix,
            is_mirror: true,
        }
    }

    pub fn repository(&self, repository: &str) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}/{repository}"),
            None => repository.to_owned(),
        }
    }
}

pub(crate) fn same_registry(a: &str, b: &str) -> bool {
    normalize_registry(a) == normalize_registry(b)
}

/// `localhost`, `127.0.0.0/8` and `::1`, with or without a port: registries that Docker and
/// go-containerregistry reach over plain HTTP when HTTPS fails, without any flag.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host a registry's API is served from: Docker Hub's name is not its API host.
pub(crate) fn api_host(registry: &str) -> String {
    if normalize_registry(registry) == "docker.io" {
        kiln_oci::reference::DOCKER_HUB_API_HOST.to_owned()
    } else {
        registry.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for yes in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.4.5",
            "[::1]:5000",
            "LOCALHOST",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "10.0.0.1:5000",
            "registry.local",
            "example.com:5000",
            "[::2]:1",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn profiles_follow_kaniko_flags() {
        let options = RegistryOptions {
            insecure: true,
            skip_tls_verify_pull: true,
            insecure_registries: vec!["plain.example".into()],
            skip_tls_verify_registries: vec!["self-signed.example:443".into()],
            ..RegistryOptions::default()
        };
        let p = options.profile("remote.example", Access::Push);
        assert!(p.allow_http && !p.skip_verify);
        let p = options.profile("remote.example", Access::Pull);
        assert!(!p.allow_http && p.skip_verify);
        assert!(options.profile("plain.example", Access::Pull).allow_http);
        assert!(
            options
                .profile("self-signed.example:443", Access::Push)
                .skip_verify
        );
        assert!(
            RegistryOptions::default()
                .profile("127.0.0.1:5000", Access::Pull)
                .allow_http
        );
    }

    #[test]
    fn mirrors_only_for_docker_hub_unless_mapped() {
        let mut options = RegistryOptions {
            registry_mirrors: vec!["mirror.example/hub".into()],
            ..RegistryOptions::default()
        };
        options
            .add_registry_map("quay.example=m1.example;m2.example:5000")
            .unwrap();
        let hub = options.pull_sources("index.docker.io");
        assert_eq!(hub.len(), 2);
        assert_eq!(hub[0].registry, "mirror.example");
        assert_eq!(hub[0].repository("library/busybox"), "hub/library/busybox");
        assert!(!hub[1].is_mirror);
        let quay = options.pull_sources("quay.example");
        let names: Vec<_> = quay.iter().map(|t| t.registry.as_str()).collect();
        assert_eq!(names, ["m1.example", "m2.example:5000", "quay.example"]);
        assert_eq!(options.pull_sources("other.example").len(), 1);
        options.skip_default_registry_fallback = true;
        assert_eq!(options.pull_sources("quay.example").len(), 2);
        assert_eq!(options.pull_sources("other.example").len(), 1);
        assert!(options.add_registry_map("nomirror=").is_err());
    }

    #[test]
    fn parses_certificate_flags() {
        let mut options = RegistryOptions::default();
        options
            .add_registry_certificate("reg.example=/certs/ca.pem")
            .unwrap();
        options
            .add_registry_client_certificate("reg.example=/c/cert.pem,/c/key.pem")
            .unwrap();
        assert_eq!(
            options.registry_certificates[0].1,
            PathBuf::from("/certs/ca.pem")
        );
        assert_eq!(
            options.registry_client_certificates[0].1.key,
            PathBuf::from("/c/key.pem")
        );
        assert!(options
            .add_registry_client_certificate("reg=/only-cert")
            .is_err());
        assert!(options.add_registry_certificate("=x").is_err());
    }

    #[test]
    fn parses_certs_dir_flags() {
        let mut options = RegistryOptions::default();
        for flag in [
            "/etc/kiln/certs.d",
            "reg.example:5000=/mnt/reg-tls",
            "./odd=name",
            "relative-certs.d",
        ] {
            options.add_registry_certs_dir(flag).unwrap();
        }
        assert_eq!(
            options.certs_dirs,
            [
                PathBuf::from("/etc/kiln/certs.d"),
                PathBuf::from("./odd=name"),
                PathBuf::from("relative-certs.d")
            ]
        );
        assert_eq!(
            options.registry_certs_dirs,
            [("reg.example:5000".to_owned(), PathBuf::from("/mnt/reg-tls"))]
        );
        for bad in ["", "=/x", "reg.example="] {
            assert!(options.add_registry_certs_dir(bad).is_err(), "{bad}");
        }
    }
}

//! The rustls configuration of registry clients.
//!
//! The system's CA certificates cost several milliseconds to read and parse (hundreds of files
//! on Debian), and a build against plain-HTTP registries, the usual in-cluster setup, never
//! verifies a certificate. So the trust store is assembled on the first certificate
//! verification, once per process, not when a client is made. Certificates named by the user
//! are still read and checked when the client is made, so a bad file fails early and by name.
//!
//! Verification is webpki's, with one addition from Go's crypto/x509 (see
//! [`crate::certificate::verify_trusted_as_itself`]): a server whose certificate is itself one
//! the user trusts is accepted whatever its basic constraints say. A refusal carries a message
//! that names the certificate and says how to trust it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::certificate::{CertificateRejection, Described, Problem, TrustAdvice};

/// A client certificate chain and its private key, presented to one registry.
pub(crate) struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads a PEM certificate chain and a PEM private key; the error says what is missing.
    /// Errors about the key are fixed phrases: the PEM parser's own messages can quote a line
    /// of the file, and no line of a key file may reach a message.
    pub fn from_pem(certificate: &[u8], key: &[u8]) -> Result<Identity, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(certificate)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
        if chain.is_empty() {
            return Err("no PEM certificate in the certificate file".to_owned());
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "private key: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the key file"
                    .to_owned()
            }
            rustls_pki_types::pem::Error::Io(e) => format!("private key: {e}"),
            _ => "private key: the key file is not well-formed PEM".to_owned(),
        })?;
        Ok(Identity { chain, key })
    }

    /// The client certificate, described for messages (never the key).
    pub fn describe(&self) -> String {
        self.chain
            .first()
            .map(|cert| Described::of(cert).summary())
            .unwrap_or_default()
    }

    /// Checks that the key fits the certificate, so a wrong pair fails when it is configured,
    /// by name, not at the first handshake.
    pub fn check(&self) -> Result<(), String> {
        client_config(Settings {
            advice: TrustAdvice {
                registry: String::new(),
                certs_dir: None,
            },
            skip_verify: false,
            system_roots: false,
            extra_roots: Vec::new(),
            identity: Some(self),
            client_auth_requested: Default::default(),
        })
        .map(drop)
    }
}

/// Parses every certificate of a PEM bundle, checking that each can be a trust anchor.
pub(crate) fn parse_roots(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in file".to_owned());
    }
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store.add(cert.clone()).map_err(|e| e.to_string())?;
    }
    Ok(certs)
}

/// What a client for one registry trusts and presents.
pub(crate) struct Settings<'a> {
    /// The registry and where its certificates would go, for the advice in refusals.
    pub advice: TrustAdvice,
    /// Accept any server certificate (`--skip-tls-verify`).
    pub skip_verify: bool,
    /// Trust the system's CA certificates as well as the built-in ones.
    pub system_roots: bool,
    /// Further trusted certificates, named by the user: CAs, or a server's own certificate.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// The client certificate for mutual TLS.
    pub identity: Option<&'a Identity>,
    /// Set when a server asks for a client certificate, so a handshake the server then
    /// breaks off can be explained.
    pub client_auth_requested: Arc<AtomicBool>,
}

/// The rustls configuration for one registry client: TLS 1.2 and 1.3 with ring, HTTP/2 and
/// HTTP/1.1 offered by ALPN, and a verifier whose trust store is built at first use.
pub(crate) fn client_config(settings: Settings<'_>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let trust = if settings.skip_verify {
        Trust::AnyCertificate
    } else {
        Trust::Roots {
            system_roots: settings.system_roots,
            extra_roots: settings.extra_roots,
            verifier: OnceLock::new(),
        }
    };
    let verifier = Arc::new(RegistryVerifier {
        provider: provider.clone(),
        trust,
        advice: settings.advice,
    });
    // Made here rather than by `with_client_auth_cert` so that a key which does not fit its
    // certificate is refused the same way, and the resolver can note the server's request.
    let key = match settings.identity {
        Some(identity) => Some(Arc::new(
            CertifiedKey::from_der(identity.chain.clone(), identity.key.clone_key(), &provider)
                .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(ClientCertificate {
            key,
            requested: settings.client_auth_requested,
        }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The client certificate presented when a server asks for one (none if none is configured),
/// noting that it was asked: a registry that demands one ends the handshake without saying
/// why, and this note is what lets the error say it.
#[derive(Debug)]
struct ClientCertificate {
    key: Option<Arc<CertifiedKey>>,
    requested: Arc<AtomicBool>,
}

impl ResolvesClientCert for ClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.requested.store(true, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// Checks a registry's certificate as `trust` says. The handshake signatures are checked in
/// every case, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct RegistryVerifier {
    provider: Arc<CryptoProvider>,
    trust: Trust,
    advice: TrustAdvice,
}

/// Which server certificates a client accepts.
#[derive(Debug)]
enum Trust {
    /// Any (`--skip-tls-verify`), as the user asked.
    AnyCertificate,
    /// WebPKI verification against the built-in roots, the system's CAs (when enabled) and
    /// the user's CAs, with the store made when the first server certificate arrives; and a
    /// server certificate that is one of the user's or the system's own is checked as Go
    /// checks a certificate found in its roots.
    Roots {
        system_roots: bool,
        extra_roots: Vec<CertificateDer<'static>>,
        verifier: OnceLock<Result<Arc<WebPkiServerVerifier>, rustls::Error>>,
    },
}

impl RegistryVerifier {
    fn webpki(
        &self,
        system: bool,
        extra: &[CertificateDer<'static>],
        verifier: &OnceLock<Result<Arc<WebPkiServerVerifier>, rustls::Error>>,
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        verifier
            .get_or_init(|| {
                let mut roots = RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                if system {
                    roots.add_parsable_certificates(system_roots().iter().cloned());
                }
                // Checked when the client was made, so none is refused here.
                roots.add_parsable_certificates(extra.iter().cloned());
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))
            })
            .clone()
    }
}

impl ServerCertVerifier for RegistryVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Trust::Roots {
            system_roots: use_system_roots,
            extra_roots,
            verifier,
        } = &self.trust
        else {
            return Ok(ServerCertVerified::assertion());
        };
        let reject = |problem: Problem, described: &Described| {
            CertificateRejection::new(&problem, described, server_name, now, &self.advice)
                .into_rustls()
        };
        let is_it = |c: &CertificateDer<'_>| c.as_ref() == end_entity.as_ref();
        let trusted_as_itself = extra_roots.iter().any(is_it)
            || (*use_system_roots && system_roots().iter().any(is_it));
        if trusted_as_itself {
            return crate::certificate::verify_trusted_as_itself(end_entity, server_name, now)
                .map(|()| ServerCertVerified::assertion())
                .map_err(|problem| reject(problem, &Described::of(end_entity)));
        }
        match self
            .webpki(*use_system_roots, extra_roots, verifier)?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(error)) => {
                let described = Described::of(end_entity);
                Err(reject(
                    Problem::from_rustls(&error, described.is_ca()),
                    &described,
                ))
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where distributions keep their CA bundle, as Go's crypto/x509 looks for it (kaniko is Go,
/// so its users' images put the bundle in one of these places).
const SYSTEM_BUNDLES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's CA certificates: `SSL_CERT_FILE` or the first bundle found, plus every PEM
/// file in the `SSL_CERT_DIR` directories, each certificate once. Unreadable or malformed
/// files are skipped: they were not named by the user, and the built-in roots remain. Read
/// once per process: every client of a build shares them.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| system_roots_from(|name| std::env::var_os(name), &SYSTEM_BUNDLES))
}

fn system_roots_from(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
    bundles: &[&str],
) -> Vec<CertificateDer<'static>> {
    let env_path = |name: &str| env(name).filter(|v| !v.is_empty());
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    match env_path("SSL_CERT_FILE") {
        Some(file) => files.push(file.into()),
        None => files.extend(
            bundles
                .iter()
                .map(std::path::PathBuf::from)
                .find(|p| p.is_file()),
        ),
    }
    if let Some(dirs) = env_path("SSL_CERT_DIR") {
        for dir in std::env::split_paths(&dirs) {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut found: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            found.sort();
            files.extend(found);
        }
    }
    // A distribution's SSL_CERT_DIR usually holds each certificate of the bundle again, under
    // its own name and a hash link: each is kept once.
    let mut seen = std::collections::HashSet::new();
    let mut roots = Vec::new();
    for file in files {
        let Ok(pem) = std::fs::read(&file) else {
            tracing::debug!(path = %file.display(), "skipping unreadable system CA file");
            continue;
        };
        for der in CertificateDer::pem_slice_iter(&pem).map_while(Result::ok) {
            if seen.insert(der.as_ref().to_vec()) {
                roots.push(der);
            }
        }
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_roots_follow_go_environment_variables() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::CertificateParams::new(vec!["other-ca.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, format!("{}{}", cert.pem(), cert.pem())).unwrap();
        let cert_dir = dir.path().join("certs");
        std::fs::create_dir(&cert_dir).unwrap();
        std::fs::write(cert_dir.join("one.pem"), cert.pem()).unwrap();
        std::fs::write(cert_dir.join("README"), "not a certificate").unwrap();
        let bundle_str = bundle.to_str().unwrap().to_owned();

        fn env(
            file: Option<&std::path::Path>,
            dir: Option<&std::path::Path>,
        ) -> impl Fn(&str) -> Option<std::ffi::OsString> {
            let (file, dir) = (
                file.map(|f| f.as_os_str().to_owned()),
                dir.map(|d| d.as_os_str().to_owned()),
            );
            move |name: &str| match name {
                "SSL_CERT_FILE" => file.clone(),
                "SSL_CERT_DIR" => dir.clone(),
                _ => None,
            }
        }
        // Each certificate counts once, however often the bundle and the directory repeat it.
        assert_eq!(system_roots_from(env(Some(&bundle), None), &[]).len(), 1);
        assert_eq!(system_roots_from(env(None, Some(&cert_dir)), &[]).len(), 1);
        assert_eq!(
            system_roots_from(env(None, Some(&cert_dir)), &["/nonexistent", &bundle_str]).len(),
            1
        );
        std::fs::write(cert_dir.join("two.pem"), other.pem()).unwrap();
        assert_eq!(
            system_roots_from(env(None, Some(&cert_dir)), &["/nonexistent", &bundle_str]).len(),
            2
        );
        assert!(system_roots_from(env(None, None), &["/nonexistent"]).is_empty());
    }

    #[test]
    fn a_client_key_that_does_not_fit_its_certificate_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let settings = |identity| Settings {
            advice: TrustAdvice {
                registry: "client.example".into(),
                certs_dir: None,
            },
            skip_verify: false,
            system_roots: false,
            extra_roots: Vec::new(),
            identity,
            client_auth_requested: Default::default(),
        };
        let fitting =
            Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        assert!(client_config(settings(Some(&fitting))).is_ok());
        let mismatched =
            Identity::from_pem(cert.pem().as_bytes(), other_key.serialize_pem().as_bytes())
                .unwrap();
        assert!(client_config(settings(Some(&mismatched))).is_err());
        let no_key = Identity::from_pem(cert.pem().as_bytes(), b"not a key");
        assert!(no_key.is_err_and(|e| e.starts_with("private key")));
    }

    #[test]
    fn a_file_without_certificates_is_not_a_ca() {
        assert!(parse_roots(b"").is_err());
        assert!(
            parse_roots(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}

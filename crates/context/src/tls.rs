//! The rustls configuration of HTTPS git remotes.
//!
//! Git over HTTPS goes through gix's reqwest transport, which is built without a crypto
//! provider of its own (no aws-lc, no OpenSSL: Kiln ships one static binary), so this module
//! hands it a complete configuration on ring. It trusts what `git` trusted: the system's CA
//! bundle (`SSL_CERT_FILE`, or the distribution's bundle, and the files in `SSL_CERT_DIR`), plus
//! the built-in Mozilla roots for images without a bundle, plus the CAs the user named.
//!
//! The system bundle is read when the first server certificate has to be checked, not when the
//! configuration is made: gix builds its HTTP client for every remote, plain-HTTP ones included,
//! and those never need it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::error::{ContextError, Result};

/// Reads every certificate of the PEM files in `paths`; a file that cannot be read or holds
/// no usable CA certificate is an error naming it.
pub(crate) fn read_ca_files(paths: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>> {
    let mut roots = Vec::new();
    for path in paths {
        let rejected = |message: String| ContextError::CaCertificate {
            path: path.clone(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| rejected(e.to_string()))?;
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| rejected(e.to_string()))?;
        if certificates.is_empty() {
            return Err(rejected("no PEM certificate found".to_owned()));
        }
        let mut store = RootCertStore::empty();
        for certificate in &certificates {
            store
                .add(certificate.clone())
                .map_err(|e| rejected(e.to_string()))?;
        }
        roots.extend(certificates);
    }
    Ok(roots)
}

/// The client configuration for one git remote: TLS 1.2 and 1.3 on ring, HTTP/1.1, and a
/// verifier that accepts any certificate when `skip_verify` (kaniko's
/// `--git insecure-skip-tls=true`) and otherwise checks against the roots described above.
pub(crate) fn client_config(
    extra_roots: Vec<CertificateDer<'static>>,
    skip_verify: bool,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(GitVerifier {
        provider: provider.clone(),
        skip_verify,
        extra_roots,
        webpki: OnceLock::new(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Checks a git server's certificate. The handshake signatures are checked even when the
/// certificate is not, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct GitVerifier {
    provider: Arc<CryptoProvider>,
    skip_verify: bool,
    extra_roots: Vec<CertificateDer<'static>>,
    webpki: OnceLock<std::result::Result<Arc<WebPkiServerVerifier>, rustls::Error>>,
}

impl GitVerifier {
    fn webpki(&self) -> std::result::Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.webpki
            .get_or_init(|| {
                let mut roots = RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                roots.add_parsable_certificates(system_roots());
                // Checked when they were read, so none is refused here.
                roots.add_parsable_certificates(self.extra_roots.iter().cloned());
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))
            })
            .clone()
    }
}

impl ServerCertVerifier for GitVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if self.skip_verify {
            return Ok(ServerCertVerified::assertion());
        }
        self.webpki()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
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
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
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

/// Where distributions keep their CA bundle; the first one present is read when
/// `SSL_CERT_FILE` is not set.
const SYSTEM_BUNDLES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's CA certificates, read once per process. Files that cannot be read or parsed
/// are skipped: the user did not name them, and the built-in roots remain.
fn system_roots() -> Vec<CertificateDer<'static>> {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
            let mut files: Vec<PathBuf> = match set("SSL_CERT_FILE") {
                Some(file) => vec![file.into()],
                None => SYSTEM_BUNDLES
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
                    .into_iter()
                    .collect(),
            };
            if let Some(dirs) = set("SSL_CERT_DIR") {
                for dir in std::env::split_paths(&dirs) {
                    files.extend(pem_files_in(&dir));
                }
            }
            let mut seen = std::collections::HashSet::new();
            let mut roots = Vec::new();
            for file in files {
                let Ok(pem) = std::fs::read(&file) else {
                    continue;
                };
                for der in CertificateDer::pem_slice_iter(&pem).map_while(|c| c.ok()) {
                    if seen.insert(der.as_ref().to_vec()) {
                        roots.push(der);
                    }
                }
            }
            roots
        })
        .clone()
}

fn pem_files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

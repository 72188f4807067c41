//! A registry's server certificate as Kiln judges and describes it: the check of a certificate
//! the user trusts as itself (Go's rule, which webpki lacks), and refusals that say what the
//! certificate is and what would make it acceptable.
//!
//! Everything here reads only the server's public certificate; no message is ever built from a
//! file the user configured, so no private key can reach one.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// What was wrong with a server certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    /// It chains to no trusted CA.
    Untrusted,
    /// It is a CA certificate (basicConstraints `CA:TRUE`) shown as the server's own, which
    /// webpki refuses unless that very certificate is trusted.
    CaAsServerCertificate,
    /// Its validity period ended, or a certificate of its chain's did.
    Expired,
    /// Its validity period has not begun.
    NotYetValid,
    /// None of its subjectAltNames is the name or address the registry was reached by.
    NameMismatch,
    /// Its extended key usage does not allow TLS server authentication.
    NotForServers,
    /// It carries a critical extension whose rules are not known (the OID).
    CriticalExtension(String),
    /// It cannot be parsed.
    Malformed,
    /// Anything else webpki refused, in its words.
    Other(String),
}

impl Problem {
    /// Classifies what webpki (through rustls) said about a certificate. `is_ca` comes from the
    /// certificate itself, because rustls hands webpki's `CaUsedAsEndEntity` on only as an
    /// opaque "other" error.
    pub(crate) fn from_rustls(error: &rustls::CertificateError, is_ca: bool) -> Problem {
        use rustls::CertificateError as E;
        match error {
            E::UnknownIssuer => Problem::Untrusted,
            E::Expired | E::ExpiredContext { .. } => Problem::Expired,
            E::NotValidYet | E::NotValidYetContext { .. } => Problem::NotYetValid,
            E::NotValidForName | E::NotValidForNameContext { .. } => Problem::NameMismatch,
            E::InvalidPurpose | E::InvalidPurposeContext { .. } => Problem::NotForServers,
            E::BadEncoding => Problem::Malformed,
            E::Other(_) if is_ca => Problem::CaAsServerCertificate,
            other => Problem::Other(other.to_string()),
        }
    }
}

/// The facts about a server certificate that a user needs to recognise it.
#[derive(Clone, Debug)]
pub(crate) struct Described {
    subject: String,
    issuer: String,
    self_issued: bool,
    /// SHA-256 of the DER bytes, as `openssl x509 -noout -fingerprint -sha256` prints it.
    fingerprint: String,
    /// `DNS:name` and `IP:address` entries of the subjectAltName extension.
    names: Vec<String>,
    has_san: bool,
    common_name: Option<String>,
    not_before: i64,
    not_after: i64,
    is_ca: bool,
    parsed: bool,
}

impl Described {
    /// Reads `der`; a certificate that does not parse is still described by its fingerprint.
    pub(crate) fn of(der: &[u8]) -> Described {
        let fingerprint = fingerprint(der);
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return Described {
                subject: String::new(),
                issuer: String::new(),
                self_issued: false,
                fingerprint,
                names: Vec::new(),
                has_san: false,
                common_name: None,
                not_before: 0,
                not_after: 0,
                is_ca: false,
                parsed: false,
            };
        };
        let (has_san, names) = san_names(&cert);
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Described {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            self_issued: cert.subject().as_raw() == cert.issuer().as_raw(),
            fingerprint,
            names,
            has_san,
            common_name,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca: cert.is_ca(),
            parsed: true,
        }
    }

    /// Whether the certificate says `CA:TRUE`.
    pub(crate) fn is_ca(&self) -> bool {
        self.is_ca
    }

    /// One phrase naming the certificate: its names, subject, issuer, fingerprint, validity.
    pub(crate) fn summary(&self) -> String {
        if !self.parsed {
            return format!(
                "an unparsable certificate (SHA-256 fingerprint {})",
                self.fingerprint
            );
        }
        let names = if self.names.is_empty() {
            "no DNS name or IP address".to_owned()
        } else {
            self.names.join(", ")
        };
        let issuer = if self.self_issued {
            "itself (self-signed)".to_owned()
        } else {
            format!("\"{}\"", self.issuer)
        };
        format!(
            "a certificate for {names} (subject \"{}\", issued by {issuer}, SHA-256 fingerprint {}, valid from {} to {})",
            self.subject,
            self.fingerprint,
            utc(self.not_before),
            utc(self.not_after)
        )
    }
}

/// Where a user can tell Kiln to trust a registry's certificate, for the advice in refusals.
#[derive(Clone, Debug)]
pub(crate) struct TrustAdvice {
    /// The registry as the user names it in flags.
    pub registry: String,
    /// The certs.d directory Kiln reads for this registry (or would, if it existed); none
    /// when no certs.d directory is searched.
    pub certs_dir: Option<PathBuf>,
}

impl TrustAdvice {
    fn how(&self, what: &str) -> String {
        let registry = &self.registry;
        let flag = format!("To trust it, give Kiln {what}: --registry-certificate {registry}=FILE");
        match &self.certs_dir {
            Some(dir) => format!(
                "{flag}, or save it as a *.crt file in {}/ (or in {registry}/ of a directory given with --registry-certs-dir)",
                dir.display()
            ),
            None => flag,
        }
    }
}

/// A refused server certificate, carried through rustls and hyper to the registry error.
/// Its message is complete: what is wrong, what the certificate is, what to do.
#[derive(Debug)]
pub(crate) struct CertificateRejection {
    message: String,
}

impl CertificateRejection {
    /// Describes `problem` with `cert`, for a server reached as `server_name` at `now`.
    pub(crate) fn new(
        problem: &Problem,
        cert: &Described,
        server_name: &ServerName<'_>,
        now: UnixTime,
        advice: &TrustAdvice,
    ) -> CertificateRejection {
        let name = server_name_text(server_name);
        let summary = cert.summary();
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let mut message = match problem {
            Problem::Untrusted if cert.self_issued || !cert.parsed => format!(
                "TLS certificate not trusted: the registry presented {summary}, which is not trusted. {}",
                advice.how("this certificate")
            ),
            Problem::Untrusted => format!(
                "TLS certificate not trusted: the registry presented {summary}, whose issuer is not a trusted CA. {}",
                advice.how(&format!("the certificate of the CA \"{}\"", cert.issuer))
            ),
            Problem::CaAsServerCertificate => format!(
                "TLS certificate not trusted: the registry presented {summary}, a CA certificate (basicConstraints CA:TRUE) as its own, which is accepted only when that very certificate is trusted (OpenSSL 3 makes such certificates with `req -x509`). {}",
                advice.how("this certificate")
            ),
            Problem::Expired if cert.parsed && cert.not_after < now => format!(
                "TLS certificate expired on {} ({} ago): the registry presented {summary}. The registry needs a new certificate",
                utc(cert.not_after),
                span(now - cert.not_after)
            ),
            Problem::Expired => format!(
                "TLS certificate chain expired: a CA certificate in the chain of {summary} is out of its validity period"
            ),
            Problem::NotYetValid => format!(
                "TLS certificate not valid before {} (the clock here says {}): the registry presented {summary}",
                utc(cert.not_before),
                utc(now)
            ),
            Problem::NameMismatch => name_mismatch(cert, &name, &summary),
            Problem::NotForServers => format!(
                "TLS certificate not meant for servers: the registry presented {summary}, whose extended key usage does not include serverAuth"
            ),
            Problem::CriticalExtension(oid) => format!(
                "TLS certificate refused: the registry presented {summary}, which has a critical extension ({oid}) whose rules Kiln does not know"
            ),
            Problem::Malformed => format!(
                "TLS certificate refused: the registry presented {summary}, which is not well-formed DER"
            ),
            Problem::Other(text) => format!(
                "TLS certificate refused ({text}): the registry presented {summary}"
            ),
        };
        // webpki stops at the first problem; the next ones the user would hit are named now,
        // so one round of fixing suffices.
        if matches!(problem, Problem::Untrusted | Problem::CaAsServerCertificate) && cert.parsed {
            if cert.not_after < now {
                message.push_str(&format!(
                    ". It has also expired, on {}",
                    utc(cert.not_after)
                ));
            }
            if !matches_name(&cert.names, server_name) {
                message.push_str(&format!(
                    ". It is also not valid for {name}, the name the registry was reached by: it names {}",
                    names_text(cert)
                ));
            }
        }
        CertificateRejection { message }
    }

    /// The message, for the registry error.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// As a rustls error, so the handshake fails with a bad-certificate alert and this
    /// rejection travels inside it.
    pub(crate) fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            std::sync::Arc::new(self),
        )))
    }
}

impl fmt::Display for CertificateRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CertificateRejection {}

/// The rejection inside a failed request's error chain, if a certificate was refused. The
/// TLS error reaches the request error as the payload of an `io::Error` (wrapped in another
/// one by the connector), and `io::Error::source()` skips its payload, so payloads are
/// looked into as well as sources.
pub(crate) fn find_rejection<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a CertificateRejection> {
    let mut next = Some(error);
    while let Some(current) = next {
        let mut layer: &(dyn std::error::Error + 'static) = current;
        loop {
            if let Some(found) = layer.downcast_ref::<CertificateRejection>() {
                return Some(found);
            }
            if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
                layer.downcast_ref::<rustls::Error>()
            {
                if let Some(found) = other.0.downcast_ref::<CertificateRejection>() {
                    return Some(found);
                }
            }
            match layer
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(payload) => layer = payload,
                None => break,
            }
        }
        next = current.source();
    }
    None
}

/// The checks Go's crypto/x509 `Certificate.Verify` makes when the server's certificate is
/// itself in `VerifyOptions.Roots` (`opts.Roots.contains(c)`): the chain is that certificate
/// alone, so its basic constraints and its signature are not looked at (Go checks
/// basicConstraints only on intermediates, and a root's self-signature never). What remains,
/// in Go's order: no unhandled critical extension, the validity period, the host name
/// (`VerifyHostname`: subjectAltName only, no common-name fallback since Go 1.15), and the
/// extended key usage (serverAuth or any, when the extension is present). This is how Docker,
/// containerd, skopeo and kaniko accept a certificate the user trusts explicitly, including
/// the `CA:TRUE` ones OpenSSL 3's `req -x509` makes; the TLS handshake's signature is verified
/// separately, so the server still has to hold the certificate's key.
pub(crate) fn verify_trusted_as_itself(
    der: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> Result<(), Problem> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| Problem::Malformed)?;
    if let Some(oid) = unhandled_critical_extension(&cert) {
        return Err(Problem::CriticalExtension(oid));
    }
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(Problem::NotYetValid);
    }
    if now > validity.not_after.timestamp() {
        return Err(Problem::Expired);
    }
    if !matches_name(&san_names(&cert).1, server_name) {
        return Err(Problem::NameMismatch);
    }
    match cert.extended_key_usage() {
        Ok(None) => Ok(()),
        Ok(Some(eku)) if eku.value.any || eku.value.server_auth => Ok(()),
        Ok(Some(_)) => Err(Problem::NotForServers),
        Err(_) => Err(Problem::Malformed),
    }
}

/// The extensions Go's certificate parser understands and so accepts when critical:
/// subjectKeyIdentifier, keyUsage, subjectAltName, basicConstraints, nameConstraints,
/// cRLDistributionPoints, certificatePolicies, policyMappings, authorityKeyIdentifier,
/// policyConstraints, extKeyUsage, inhibitAnyPolicy and authorityInfoAccess.
const HANDLED_EXTENSIONS: [&str; 13] = [
    "2.5.29.14",
    "2.5.29.15",
    "2.5.29.17",
    "2.5.29.19",
    "2.5.29.30",
    "2.5.29.31",
    "2.5.29.32",
    "2.5.29.33",
    "2.5.29.35",
    "2.5.29.36",
    "2.5.29.37",
    "2.5.29.54",
    "1.3.6.1.5.5.7.1.1",
];

fn unhandled_critical_extension(cert: &X509Certificate<'_>) -> Option<String> {
    cert.extensions()
        .iter()
        .filter(|ext| ext.critical)
        .map(|ext| ext.oid.to_id_string())
        .find(|oid| !HANDLED_EXTENSIONS.contains(&oid.as_str()))
}

/// Go's `VerifyHostname`: an IP address (brackets allowed) matches an IP subjectAltName, IPv4
/// and its IPv4-mapped IPv6 form being the same; a DNS name matches a DNS subjectAltName
/// case-insensitively, ignoring one trailing dot, with `*` allowed as the whole leftmost
/// label. The common name is never used.
fn matches_name(names: &[String], server_name: &ServerName<'_>) -> bool {
    match server_name {
        ServerName::IpAddress(ip) => {
            let wanted = canonical(IpAddr::from(*ip));
            names
                .iter()
                .filter_map(|n| n.strip_prefix("IP:"))
                .filter_map(|n| n.parse::<IpAddr>().ok())
                .any(|ip| canonical(ip) == wanted)
        }
        ServerName::DnsName(dns) => {
            let host = dns.as_ref().trim_end_matches('.').to_ascii_lowercase();
            names
                .iter()
                .filter_map(|n| n.strip_prefix("DNS:"))
                .any(|pattern| host_matches(&pattern.to_ascii_lowercase(), &host))
        }
        _ => false,
    }
}

/// Whether the certificate has a subjectAltName extension, and its `DNS:` and `IP:` entries.
fn san_names(cert: &X509Certificate<'_>) -> (bool, Vec<String>) {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => (
            true,
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(format!("DNS:{dns}")),
                    GeneralName::IPAddress(bytes) => ip_of(bytes).map(|ip| format!("IP:{ip}")),
                    _ => None,
                })
                .collect(),
        ),
        _ => (false, Vec::new()),
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.');
    if pattern.is_empty() || host.is_empty() {
        return false;
    }
    let pattern_labels: Vec<&str> = pattern.split('.').collect();
    let host_labels: Vec<&str> = host.split('.').collect();
    pattern_labels.len() == host_labels.len()
        && pattern_labels
            .iter()
            .zip(&host_labels)
            .enumerate()
            .all(|(i, (p, h))| (i == 0 && *p == "*") || p == h)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn name_mismatch(cert: &Described, name: &str, summary: &str) -> String {
    if cert.parsed && !cert.has_san {
        let cn = cert
            .common_name
            .as_deref()
            .map(|cn| {
                format!(" (its common name \"{cn}\" is not used for matching, as in Go since 1.15)")
            })
            .unwrap_or_default();
        return format!(
            "TLS certificate not valid for {name}: the registry presented {summary}, which has no subjectAltName extension{cn}. Make the certificate with a subjectAltName for {name} (openssl: -addext subjectAltName={})",
            san_for(name)
        );
    }
    format!(
        "TLS certificate not valid for {name}: the registry presented {summary}, whose names are {}. Reach the registry by one of those names, or give it a certificate whose subjectAltName includes {}",
        names_text(cert),
        san_for(name)
    )
}

fn names_text(cert: &Described) -> String {
    if cert.names.is_empty() {
        "none".to_owned()
    } else {
        cert.names.join(", ")
    }
}

fn san_for(name: &str) -> String {
    if name.parse::<IpAddr>().is_ok() {
        format!("IP:{name}")
    } else {
        format!("DNS:{name}")
    }
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_owned(),
        ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// `AB:CD:…`, the form OpenSSL prints, so the user can compare it with
/// `openssl x509 -noout -fingerprint -sha256 -in FILE`.
fn fingerprint(der: &[u8]) -> String {
    let hex = kiln_oci::Digest::sha256_of(der).hex().to_ascii_uppercase();
    let mut out = String::with_capacity(hex.len() / 2 * 3);
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(std::str::from_utf8(pair).unwrap_or("??"));
    }
    out
}

/// `2024-01-02 03:04:05 UTC` for a Unix time.
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian), after Howard Hinnant.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A rough length of time: the largest whole unit.
fn span(secs: i64) -> String {
    let plural = |n: i64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    match secs {
        s if s >= 86_400 => plural(s / 86_400, "day"),
        s if s >= 3600 => plural(s / 3600, "hour"),
        s if s >= 60 => plural(s / 60, "minute"),
        s => plural(s.max(0), "second"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(names: &[&str]) -> Described {
        Described {
            subject: "CN=x".into(),
            issuer: "CN=x".into(),
            self_issued: true,
            fingerprint: String::new(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            has_san: true,
            common_name: None,
            not_before: 0,
            not_after: 0,
            is_ca: false,
            parsed: true,
        }
    }

    fn name(text: &str) -> ServerName<'static> {
        ServerName::try_from(text.to_owned()).unwrap()
    }

    #[test]
    fn names_match_as_go_matches_them() {
        let cert = described(&["DNS:*.Example.com", "DNS:registry.test.", "IP:127.0.0.1"]);
        for yes in [
            "a.example.com",
            "A.EXAMPLE.COM",
            "registry.test",
            "registry.test.",
            "127.0.0.1",
            "::ffff:127.0.0.1",
        ] {
            assert!(matches_name(&cert.names, &name(yes)), "{yes}");
        }
        for no in [
            "example.com",
            "a.b.example.com",
            "other.test",
            "127.0.0.2",
            "::1",
        ] {
            assert!(!matches_name(&cert.names, &name(no)), "{no}");
        }
        // The common name is never a name to match.
        let cn_only = Described {
            common_name: Some("registry.test".into()),
            has_san: false,
            ..described(&[])
        };
        assert!(!matches_name(&cn_only.names, &name("registry.test")));
    }

    /// Go's checks of a certificate trusted as itself, each one failing alone. The
    /// certificates are CA:TRUE, which the checks must not mind.
    #[test]
    fn a_certificate_trusted_as_itself_is_checked_as_go_checks_it() {
        use rcgen::{
            date_time_ymd, BasicConstraints, CertificateParams, CustomExtension,
            ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let make = |edit: &dyn Fn(&mut CertificateParams)| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["registry.test".to_owned()]).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2030, 1, 1);
            edit(&mut params);
            params.self_signed(&key).unwrap().der().clone()
        };
        let at = |y: u64| UnixTime::since_unix_epoch(std::time::Duration::from_secs(y));
        let in_2025 = at(1_750_000_000);
        let check = |der: &CertificateDer<'_>, host: &str, now| {
            verify_trusted_as_itself(der, &name(host), now)
        };

        let plain = make(&|_| {});
        assert_eq!(check(&plain, "registry.test", in_2025), Ok(()));
        assert_eq!(check(&plain, "REGISTRY.test.", in_2025), Ok(()));
        assert_eq!(
            check(&plain, "other.test", in_2025),
            Err(Problem::NameMismatch)
        );
        assert_eq!(
            check(&plain, "registry.test", at(1_500_000_000)),
            Err(Problem::NotYetValid)
        );
        assert_eq!(
            check(&plain, "registry.test", at(1_950_000_000)),
            Err(Problem::Expired)
        );

        let server = make(&|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]);
        assert_eq!(check(&server, "registry.test", in_2025), Ok(()));
        let client = make(&|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]);
        assert_eq!(
            check(&client, "registry.test", in_2025),
            Err(Problem::NotForServers)
        );

        let strange = make(&|p| {
            let mut ext =
                CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
            ext.set_criticality(true);
            p.custom_extensions = vec![ext];
        });
        assert_eq!(
            check(&strange, "registry.test", in_2025),
            Err(Problem::CriticalExtension("1.3.6.1.4.1.99999.1".into()))
        );
        assert_eq!(
            check(
                &CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]),
                "x",
                in_2025
            ),
            Err(Problem::Malformed)
        );
    }

    #[test]
    fn dates_and_fingerprints_read_as_openssl_prints_them() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_609_459_200), "2021-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(span(90_000), "1 day");
        assert_eq!(span(7_200), "2 hours");
        let fp = fingerprint(b"");
        assert!(fp.starts_with("E3:B0:C4:42"), "{fp}");
        assert_eq!(fp.len(), 32 * 3 - 1);
    }

    #[test]
    fn a_name_mismatch_lists_the_names_and_the_fix() {
        let cert = described(&["DNS:registry.test"]);
        let advice = TrustAdvice {
            registry: "127.0.0.1:5000".into(),
            certs_dir: Some("/etc/docker/certs.d/127.0.0.1:5000".into()),
        };
        let message = CertificateRejection::new(
            &Problem::NameMismatch,
            &cert,
            &name("127.0.0.1"),
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(10)),
            &advice,
        )
        .to_string();
        assert!(
            message.starts_with("TLS certificate not valid for 127.0.0.1:"),
            "{message}"
        );
        assert!(
            message.contains("whose names are DNS:registry.test"),
            "{message}"
        );
        assert!(message.contains("IP:127.0.0.1"), "{message}");
    }
}

//! Per-registry certificate directories laid out as Docker and containers/image (podman,
//! skopeo, buildah) lay them out: a certs.d directory holds one `HOST[:PORT]` directory per
//! registry, and in it `*.crt` files are CA certificates (or a server's own certificate)
//! trusted for that registry, and each `NAME.cert` with its `NAME.key` is a client
//! certificate for mutual TLS.
//!
//! Files are opened through their paths, so the symlinks a kubelet makes when it mounts a
//! Secret (`ca.crt -> ..data/ca.crt`, `..data -> ..2026_01_01_…`) are followed, as Docker
//! follows them. Everything is read when the client is made: in-place builds delete `/`
//! later, and a file named by the user should fail early and by name.

use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;

use crate::tls::Identity;

/// The certs.d directories Docker, containerd's Docker-compatible mode and containers/image
/// read, in the order containers/image searches them.
pub(crate) const SYSTEM_CERTS_DIRS: [&str; 2] = ["/etc/containers/certs.d", "/etc/docker/certs.d"];

/// What went wrong with a file or directory, without its content.
#[derive(Clone, Debug)]
pub(crate) struct DirError {
    pub path: PathBuf,
    pub message: String,
}

/// A registry directory found under a certs.d directory: the registry it is named after, and
/// its files or what was wrong with them.
pub(crate) type HostDir = (String, Result<HostFiles, DirError>);

/// One registry's certificate files, read as Docker's `ReadCertsDirectory` reads them.
pub(crate) struct HostFiles {
    /// The directory they came from.
    pub dir: PathBuf,
    /// Every certificate of every `*.crt` file.
    pub cas: Vec<CertificateDer<'static>>,
    /// The first `NAME.cert`/`NAME.key` pair in name order.
    pub identity: Option<Identity>,
}

/// Reads the `*.crt`, `*.cert` and `*.key` files of one registry's directory, in name order.
/// Other files are none of Docker's business and are left alone, as Docker leaves them. A
/// `.cert` without its `.key` (or the reverse), a `.crt` without a certificate and a pair
/// whose key does not fit are errors naming the file.
pub(crate) fn read_host_dir(dir: &Path) -> Result<HostFiles, DirError> {
    let fail = |path: &Path, message: String| DirError {
        path: path.to_owned(),
        message,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| fail(dir, e.to_string()))?;
    let mut names: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| fail(dir, e.to_string()))?;
        match entry.file_name().into_string() {
            Ok(name) => names.push(name),
            Err(name) => {
                tracing::debug!(dir = %dir.display(), ?name, "skipping a file name that is not UTF-8")
            }
        }
    }
    names.sort();
    let has = |name: &str| names.iter().any(|n| n == name);
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| fail(&path, e.to_string()))
    };
    let mut files = HostFiles {
        dir: dir.to_owned(),
        cas: Vec::new(),
        identity: None,
    };
    let mut pairs = Vec::new();
    for name in &names {
        if name.ends_with(".crt") {
            let path = dir.join(name);
            let pem = read(name)?;
            let certs = crate::tls::parse_roots(&pem).map_err(|e| fail(&path, e))?;
            tracing::debug!(path = %path.display(), certificates = certs.len(), "trusted certificates from certs.d");
            files.cas.extend(certs);
        } else if let Some(base) = name.strip_suffix(".cert") {
            let key = format!("{base}.key");
            if !has(&key) {
                return Err(fail(
                    &dir.join(name),
                    format!("client certificate without its key {key} (CA certificates must be named *.crt)"),
                ));
            }
            pairs.push((name.clone(), key));
        } else if let Some(base) = name.strip_suffix(".key") {
            let cert = format!("{base}.cert");
            if !has(&cert) {
                return Err(fail(
                    &dir.join(name),
                    format!("private key without its client certificate {cert}"),
                ));
            }
        }
    }
    if pairs.len() > 1 {
        tracing::warn!(
            dir = %dir.display(),
            using = %pairs[0].0,
            "several client certificates for one registry; the first in name order is presented"
        );
    }
    if let Some((cert, key)) = pairs.into_iter().next() {
        let cert_path = dir.join(&cert);
        let identity = Identity::from_pem(&read(&cert)?, &read(&key)?)
            .and_then(|identity| identity.check().map(|()| identity))
            .map_err(|e| {
                fail(
                    &cert_path,
                    format!("certificate and key {key} are not a usable pair: {e}"),
                )
            })?;
        tracing::debug!(path = %cert_path.display(), "client certificate from certs.d");
        files.identity = Some(identity);
    }
    Ok(files)
}

/// The registry directories under one certs.d directory: every subdirectory (symlinks to
/// directories included, as a Secret mounted with `items: [{path: HOST/ca.crt}]` makes them),
/// named by the registry it is for, each read or its error kept for when that registry is
/// used (Docker too looks only at the directory of the registry it talks to). Names starting
/// with `.` are a kubelet's bookkeeping (`..data`), never a registry.
pub(crate) fn read_root(root: &Path) -> Result<Vec<HostDir>, DirError> {
    let fail = |message: String| DirError {
        path: root.to_owned(),
        message,
    };
    let mut hosts = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| fail(e.to_string()))? {
        let entry = entry.map_err(|e| fail(e.to_string()))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        hosts.push((name, read_host_dir(&path)));
    }
    hosts.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["registry.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn reads_docker_names_and_refuses_half_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        std::fs::write(dir.path().join("ca.crt"), &cert).unwrap();
        std::fs::write(dir.path().join("client.cert"), &cert).unwrap();
        std::fs::write(dir.path().join("client.key"), &key).unwrap();
        std::fs::write(dir.path().join("README"), "not read").unwrap();
        let files = read_host_dir(dir.path()).unwrap();
        assert_eq!(files.cas.len(), 1);
        assert!(files.identity.is_some());

        std::fs::remove_file(dir.path().join("client.key")).unwrap();
        let err = read_host_dir(dir.path()).err().unwrap();
        assert!(err.path.ends_with("client.cert"), "{err:?}");
        assert!(err.message.contains("client.key"), "{err:?}");

        std::fs::rename(dir.path().join("client.cert"), dir.path().join("other.key")).unwrap();
        let err = read_host_dir(dir.path()).err().unwrap();
        assert!(err.message.contains("other.cert"), "{err:?}");
    }

    #[test]
    fn a_crt_holding_a_key_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key) = self_signed();
        std::fs::write(dir.path().join("ca.crt"), &key).unwrap();
        let err = read_host_dir(dir.path()).err().unwrap();
        let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!body.is_empty());
        for line in body {
            assert!(!err.message.contains(line), "{err:?}");
        }
    }
}

//! Where content lives: a repository in a registry, and the tag-or-digest that names a
//! manifest in it. Validated so that nothing a user types can change the request URL.

use std::fmt;

use kiln_oci::{Digest, Reference};

use crate::error::Error;

/// A repository on a registry, e.g. registry `127.0.0.1:5000`, name `team/app`.
///
/// The registry is the host (with optional port) as the user wrote it; Docker Hub may be
/// given as `docker.io` and its API host is used automatically. Parse user input with
/// [`kiln_oci::Reference`] (Docker's normalisation: `busybox` → `docker.io/library/busybox`)
/// and convert with `Repository::from(&reference)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    registry: String,
    name: String,
}

impl Repository {
    /// Checks both parts against the distribution grammar (lowercase path components joined
    /// by `/`, separators `.`, `_`, `__`, `-`; a host with an optional port).
    pub fn new(registry: impl Into<String>, name: impl Into<String>) -> Result<Self, Error> {
        let registry = registry.into();
        let name = name.into();
        if !valid_registry(&registry) {
            return Err(Error::InvalidArgument(format!(
                "registry {registry:?} is not a host with an optional port"
            )));
        }
        if !valid_repository_name(&name) {
            return Err(Error::InvalidArgument(format!(
                "repository name {name:?} is invalid: use lowercase letters, digits and . _ - separated by /"
            )));
        }
        Ok(Repository { registry, name })
    }

    /// The registry host, with port if any.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same repository path on another registry (a mirror, or a change of registry).
    pub fn with_registry(&self, registry: impl Into<String>) -> Result<Self, Error> {
        Repository::new(registry, self.name.clone())
    }
}

impl From<&Reference> for Repository {
    /// The repository a parsed reference points into (already validated by `kiln-oci`).
    fn from(reference: &Reference) -> Self {
        Repository {
            registry: reference.registry().to_owned(),
            name: reference.repository().to_owned(),
        }
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// Whether `reference` is a valid tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
pub fn valid_tag(reference: &str) -> bool {
    let mut chars = reference.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    reference.len() <= 128
        && (first.is_ascii_alphanumeric() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A manifest reference: tag or digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ManifestRef {
    Tag(String),
    Digest(Digest),
}

impl ManifestRef {
    pub(crate) fn parse(reference: &str) -> Result<Self, Error> {
        if reference.contains(':') {
            Digest::parse(reference)
                .map(ManifestRef::Digest)
                .map_err(|e| Error::InvalidArgument(e.to_string()))
        } else if valid_tag(reference) {
            Ok(ManifestRef::Tag(reference.to_owned()))
        } else {
            Err(Error::InvalidArgument(format!(
                "{reference:?} is neither a tag nor a digest"
            )))
        }
    }
}

impl fmt::Display for ManifestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestRef::Tag(t) => f.write_str(t),
            ManifestRef::Digest(d) => write!(f, "{d}"),
        }
    }
}

fn valid_registry(registry: &str) -> bool {
    if registry.is_empty() || registry.len() > 255 {
        return false;
    }
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, tail)) => {
                if ip.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, tail.strip_prefix(':'))
            }
            None => return false,
        }
    } else {
        match registry.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    let host_ok = host.is_none_or(|h| {
        !h.is_empty()
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    host_ok && port_ok
}

fn valid_repository_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|component| {
            let bytes = component.as_bytes();
            let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
                return false;
            }
            // Separators: one '.', one or two '_', or any run of '-'.
            let mut i = 0;
            while i < bytes.len() {
                if alnum(bytes[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < bytes.len() && !alnum(bytes[i]) {
                    i += 1;
                }
                let sep = &component[start..i];
                let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
                if !ok {
                    return false;
                }
            }
            true
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names() {
        for ok in ["app", "team/app", "a.b_c__d--e/f", "library/busybox"] {
            assert!(Repository::new("127.0.0.1:5000", ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "App", "a//b", "../x", "a/", "x?y", "a..b", "a___b", "-a",
        ] {
            assert!(Repository::new("127.0.0.1:5000", bad).is_err(), "{bad}");
        }
        for ok in ["localhost", "reg.example:443", "[::1]:5000", "docker.io"] {
            assert!(Repository::new(ok, "a").is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "host:port", "host:99999", "a..b", "[zz]"] {
            assert!(Repository::new(bad, "a").is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_manifest_references() {
        assert_eq!(
            ManifestRef::parse("v1.0").unwrap(),
            ManifestRef::Tag("v1.0".into())
        );
        let digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(matches!(
            ManifestRef::parse(digest).unwrap(),
            ManifestRef::Digest(_)
        ));
        assert!(ManifestRef::parse("../x").is_err());
        assert!(ManifestRef::parse(".hidden").is_err());
        assert!(ManifestRef::parse("sha256:short").is_err());
    }
}

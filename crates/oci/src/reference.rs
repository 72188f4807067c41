//! Image references (`busybox`, `127.0.0.1:5000/app:1.0`, `ghcr.io/o/r@sha256:…`) parsed and
//! normalised the way the Docker CLI does, so a name means the same image in Kiln as in
//! `docker pull`: a name without a registry is on Docker Hub (`docker.io`), a single-component
//! Docker Hub name is under `library/`, `index.docker.io` is an alias of `docker.io`, and a
//! reference without tag or digest means `:latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The canonical name of Docker Hub in references.
pub const DOCKER_HUB_REGISTRY: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// The legacy name of Docker Hub, normalised to [`DOCKER_HUB_REGISTRY`].
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
/// The namespace of Docker Hub's official images.
const OFFICIAL_PREFIX: &str = "library/";
/// The tag implied by a reference that has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest registry + `/` + repository name distribution accepts.
const MAX_NAME_LEN: usize = 255;
/// Longest tag distribution accepts.
const MAX_TAG_LEN: usize = 128;

/// Why a string is not a valid image reference. Every variant names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The input is empty.
    #[error("invalid image reference: empty name")]
    Empty,
    /// The repository part has uppercase letters, which Docker never normalises away.
    #[error("invalid image reference {input:?}: repository name {repository:?} must be lowercase")]
    Uppercase {
        /// The whole input.
        input: String,
        /// The offending repository part.
        repository: String,
    },
    /// A bare 64-character hex string, which Docker reserves for image IDs.
    #[error("invalid image reference {0:?}: a 64-character hexadecimal string is an image ID, not a repository name")]
    ImageId(String),
    /// The registry part is not a host name, IP address or bracketed IPv6 address with an
    /// optional port.
    #[error("invalid image reference {input:?}: invalid registry {registry:?}")]
    InvalidRegistry {
        /// The whole input.
        input: String,
        /// The offending registry part.
        registry: String,
    },
    /// The repository path has an empty or malformed component.
    #[error("invalid image reference {input:?}: invalid repository name {repository:?} (components are lowercase letters and digits separated by '.', '_', '__' or dashes)")]
    InvalidRepository {
        /// The whole input.
        input: String,
        /// The offending repository part.
        repository: String,
    },
    /// The tag has characters other than `[A-Za-z0-9_.-]`, starts with `.` or `-`, or is too long.
    #[error("invalid image reference {input:?}: invalid tag {tag:?} (at most 128 of [A-Za-z0-9_.-], not starting with '.' or '-')")]
    InvalidTag {
        /// The whole input.
        input: String,
        /// The offending tag.
        tag: String,
    },
    /// The part after `@` is not a valid digest.
    #[error("invalid image reference {input:?}: {source}")]
    InvalidDigest {
        /// The whole input.
        input: String,
        /// What is wrong with the digest.
        source: DigestError,
    },
    /// Registry and repository together are longer than 255 characters.
    #[error("invalid image reference {0:?}: name longer than 255 characters")]
    TooLong(String),
}

/// A normalised image reference: registry, repository, and a tag and/or digest.
///
/// At least one of tag and digest is always present: a parsed reference without either gets
/// the tag `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises a reference as `docker pull` would.
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if input.len() == 64
            && input
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(ReferenceError::ImageId(input.to_owned()));
        }
        let (name_and_tag, digest) = match input.split_once('@') {
            Some((name, digest)) => {
                let digest =
                    Digest::parse(digest).map_err(|source| ReferenceError::InvalidDigest {
                        input: input.to_owned(),
                        source,
                    })?;
                (name, Some(digest))
            }
            None => (input, None),
        };
        let (registry, remainder) = split_registry(name_and_tag);
        // After the registry is split off, a ':' can only introduce the tag.
        let (repository, tag) = match remainder.rsplit_once(':') {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (remainder, None),
        };
        if repository.to_lowercase() != repository {
            return Err(ReferenceError::Uppercase {
                input: input.to_owned(),
                repository: repository.to_owned(),
            });
        }
        let registry = normalise_registry(registry);
        let repository = if registry == DOCKER_HUB_REGISTRY && !repository.contains('/') {
            format!("{OFFICIAL_PREFIX}{repository}")
        } else {
            repository.to_owned()
        };
        if !is_valid_registry(registry) {
            return Err(ReferenceError::InvalidRegistry {
                input: input.to_owned(),
                registry: registry.to_owned(),
            });
        }
        if !is_valid_repository(&repository) {
            return Err(ReferenceError::InvalidRepository {
                input: input.to_owned(),
                repository,
            });
        }
        if let Some(tag) = tag {
            if !is_valid_tag(tag) {
                return Err(ReferenceError::InvalidTag {
                    input: input.to_owned(),
                    tag: tag.to_owned(),
                });
            }
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::TooLong(input.to_owned()));
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_owned()),
        };
        Ok(Reference {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// The registry host, with port if any: `docker.io`, `127.0.0.1:5000`, `localhost`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path within the registry: `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Whether the image is on Docker Hub.
    pub fn is_docker_hub(&self) -> bool {
        self.registry == DOCKER_HUB_REGISTRY
    }

    /// `registry/repository` without tag or digest, e.g. `docker.io/library/busybox`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to put in `/v2/<repository>/manifests/<reference>`: the digest when pinned (it
    /// wins over a tag, as in Docker), otherwise the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }

    /// The short form the Docker CLI shows and `docker save` writes in `RepoTags`:
    /// `busybox:latest`, `someone/app:1`, `127.0.0.1:5000/app:1`.
    pub fn familiar(&self) -> String {
        let short = self
            .repository
            .strip_prefix(OFFICIAL_PREFIX)
            .filter(|rest| !rest.contains('/'))
            .unwrap_or(&self.repository);
        // A Docker Hub repository whose first component looks like a host (`docker.io/o.y/t`)
        // keeps its registry, or the short form would name an image on the registry `o.y`.
        let first = short.split_once('/').map(|(first, _)| first);
        let mut name = if self.is_docker_hub() && !first.is_some_and(looks_like_registry) {
            short.to_owned()
        } else {
            self.name()
        };
        self.push_suffix(&mut name);
        name
    }

    /// The same repository on another registry, for mirrors and `--registry-map`. A
    /// `index.docker.io` argument is normalised to `docker.io`.
    pub fn with_registry(&self, registry: &str) -> Result<Reference, ReferenceError> {
        let registry = normalise_registry(registry);
        if !is_valid_registry(registry) {
            return Err(ReferenceError::InvalidRegistry {
                input: self.to_string(),
                registry: registry.to_owned(),
            });
        }
        // Keep the canonical form a fixed point: single-component names on Docker Hub live
        // under `library/`.
        let repository = if registry == DOCKER_HUB_REGISTRY && !self.repository.contains('/') {
            format!("{OFFICIAL_PREFIX}{}", self.repository)
        } else {
            self.repository.clone()
        };
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::TooLong(format!("{registry}/{repository}")));
        }
        Ok(Reference {
            registry: registry.to_owned(),
            repository,
            ..self.clone()
        })
    }

    /// The same repository with `tag` and no digest, e.g. a destination to push to.
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        if !is_valid_tag(tag) {
            return Err(ReferenceError::InvalidTag {
                input: format!("{}:{tag}", self.name()),
                tag: tag.to_owned(),
            });
        }
        Ok(Reference {
            tag: Some(tag.to_owned()),
            digest: None,
            ..self.clone()
        })
    }

    /// The same reference pinned to `digest`; the tag, if any, is kept for display.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    fn push_suffix(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(&digest.to_string());
        }
    }
}

impl fmt::Display for Reference {
    /// The canonical, fully qualified form: `docker.io/library/busybox:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = self.name();
        self.push_suffix(&mut s);
        f.write_str(&s)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl serde::Serialize for Reference {
    /// As the canonical string, so stored references re-parse to the same value.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Reference::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Splits `name[:tag]` into registry and the rest, with Docker's rule: the first path
/// component is a registry only if it looks like a host (has `.` or `:`, is `localhost`, or
/// has uppercase letters, which repositories can't).
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest)) if looks_like_registry(first) => (first, rest),
        _ => (DOCKER_HUB_REGISTRY, name),
    }
}

/// Docker's test for whether the first component of a name is a registry host.
fn looks_like_registry(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost" || first.to_lowercase() != first
}

fn normalise_registry(registry: &str) -> &str {
    if registry == DOCKER_HUB_LEGACY {
        DOCKER_HUB_REGISTRY
    } else {
        registry
    }
}

/// `host[:port]` where host is a DNS name (components of letters, digits and inner dashes) or
/// a bracketed IPv6 address.
fn is_valid_registry(registry: &str) -> bool {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("ipv6", Some(port)),
                None => return false,
            },
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|component| {
            let bytes = component.as_bytes();
            !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        })
}

/// Path components of lowercase alphanumerics joined by `.`, `_`, `__` or runs of `-`.
fn is_valid_repository(repository: &str) -> bool {
    repository.split('/').all(|component| {
        let bytes = component.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if bytes.is_empty() || !alnum(&bytes[0]) || !alnum(&bytes[bytes.len() - 1]) {
            return false;
        }
        let mut i = 0;
        while i < bytes.len() {
            if alnum(&bytes[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && !alnum(&bytes[i]) {
                i += 1;
            }
            let separator = &component[start..i];
            let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
            if !ok {
                return false;
            }
        }
        true
    })
}

fn is_valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// input, registry, repository, tag, has digest, canonical form
    type NormalisationCase<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, bool, String);
    /// input, check of the error kind
    type ErrorCase<'a> = (&'a str, fn(&ReferenceError) -> bool);

    #[test]
    fn normalisation_table() {
        let cases: &[NormalisationCase] = &[
            (
                "busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
                "docker.io/library/busybox:latest".into(),
            ),
            (
                "busybox:1.36",
                "docker.io",
                "library/busybox",
                Some("1.36"),
                false,
                "docker.io/library/busybox:1.36".into(),
            ),
            (
                "library/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
                "docker.io/library/busybox:latest".into(),
            ),
            (
                "docker.io/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
                "docker.io/library/busybox:latest".into(),
            ),
            (
                "index.docker.io/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
                "docker.io/library/busybox:latest".into(),
            ),
            (
                "index.docker.io/library/busybox:musl",
                "docker.io",
                "library/busybox",
                Some("musl"),
                false,
                "docker.io/library/busybox:musl".into(),
            ),
            (
                "someone/app",
                "docker.io",
                "someone/app",
                Some("latest"),
                false,
                "docker.io/someone/app:latest".into(),
            ),
            (
                "someone/team/app:v1",
                "docker.io",
                "someone/team/app",
                Some("v1"),
                false,
                "docker.io/someone/team/app:v1".into(),
            ),
            (
                "localhost/app",
                "localhost",
                "app",
                Some("latest"),
                false,
                "localhost/app:latest".into(),
            ),
            (
                "localhost:5000/app:dev",
                "localhost:5000",
                "app",
                Some("dev"),
                false,
                "localhost:5000/app:dev".into(),
            ),
            (
                "127.0.0.1:5000/ns/app",
                "127.0.0.1:5000",
                "ns/app",
                Some("latest"),
                false,
                "127.0.0.1:5000/ns/app:latest".into(),
            ),
            (
                "[::1]:5000/app:1",
                "[::1]:5000",
                "app",
                Some("1"),
                false,
                "[::1]:5000/app:1".into(),
            ),
            (
                "gcr.io/project/app",
                "gcr.io",
                "project/app",
                Some("latest"),
                false,
                "gcr.io/project/app:latest".into(),
            ),
            (
                "Registry/app",
                "Registry",
                "app",
                Some("latest"),
                false,
                "Registry/app:latest".into(),
            ),
            (
                "my-registry.example.com:443/a.b/c_d/e__f/g--h",
                "my-registry.example.com:443",
                "a.b/c_d/e__f/g--h",
                Some("latest"),
                false,
                "my-registry.example.com:443/a.b/c_d/e__f/g--h:latest".into(),
            ),
            (
                &format!("busybox@{D}"),
                "docker.io",
                "library/busybox",
                None,
                true,
                format!("docker.io/library/busybox@{D}"),
            ),
            (
                &format!("ghcr.io/o/r:1.0@{D}"),
                "ghcr.io",
                "o/r",
                Some("1.0"),
                true,
                format!("ghcr.io/o/r:1.0@{D}"),
            ),
            (
                &format!("127.0.0.1:5000/app@{D}"),
                "127.0.0.1:5000",
                "app",
                None,
                true,
                format!("127.0.0.1:5000/app@{D}"),
            ),
            (
                "app:_Tag.With-Chars_",
                "docker.io",
                "library/app",
                Some("_Tag.With-Chars_"),
                false,
                "docker.io/library/app:_Tag.With-Chars_".into(),
            ),
        ];
        for (input, registry, repository, tag, has_digest, canonical) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry(), *registry, "{input}");
            assert_eq!(r.repository(), *repository, "{input}");
            assert_eq!(r.tag(), *tag, "{input}");
            assert_eq!(r.digest().is_some(), *has_digest, "{input}");
            assert_eq!(&r.to_string(), canonical, "{input}");
            // The canonical form is a fixed point.
            assert_eq!(Reference::parse(canonical).unwrap(), r, "{input}");
        }
    }

    #[test]
    fn errors_name_the_input() {
        let long_repo = format!("a/{}", "b".repeat(260));
        let long_tag = format!("app:{}", "t".repeat(129));
        let cases: &[ErrorCase] = &[
            ("", |e| matches!(e, ReferenceError::Empty)),
            ("Busybox", |e| matches!(e, ReferenceError::Uppercase { .. })),
            ("docker.io/Library/busybox", |e| {
                matches!(e, ReferenceError::Uppercase { .. })
            }),
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                |e| matches!(e, ReferenceError::ImageId(_)),
            ),
            ("busybox@sha256:abc", |e| {
                matches!(e, ReferenceError::InvalidDigest { .. })
            }),
            ("busybox@md5:abc", |e| {
                matches!(e, ReferenceError::InvalidDigest { .. })
            }),
            ("busybox:-bad", |e| {
                matches!(e, ReferenceError::InvalidTag { .. })
            }),
            ("busybox:", |e| {
                matches!(e, ReferenceError::InvalidTag { .. })
            }),
            ("busybox:a/b", |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            (&long_tag, |e| {
                matches!(e, ReferenceError::InvalidTag { .. })
            }),
            ("-bad/app", |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("a//b", |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("app_/x", |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("a...b", |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("a___b", |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            ("host:port/app", |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            ("-host.com/app", |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            ("host..com/app", |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            ("[zz]:5000/app", |e| {
                matches!(e, ReferenceError::InvalidRegistry { .. })
            }),
            ("app with space", |e| {
                matches!(e, ReferenceError::InvalidRepository { .. })
            }),
            (&long_repo, |e| matches!(e, ReferenceError::TooLong(_))),
        ];
        for (input, expected) in cases {
            let err = Reference::parse(input).expect_err(input);
            assert!(expected(&err), "{input}: unexpected error {err:?}");
            if !input.is_empty() {
                assert!(
                    err.to_string().contains(&format!("{input:?}")),
                    "error for {input} does not name it: {err}"
                );
            }
        }
    }

    #[test]
    fn manifest_reference_prefers_digest() {
        assert_eq!(
            Reference::parse("busybox").unwrap().manifest_reference(),
            "latest"
        );
        assert_eq!(
            Reference::parse("busybox:1").unwrap().manifest_reference(),
            "1"
        );
        let pinned = Reference::parse(&format!("busybox:1@{D}")).unwrap();
        assert_eq!(pinned.manifest_reference(), D);
    }

    #[test]
    fn serde_uses_the_canonical_string() {
        let r = Reference::parse("busybox").unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#""docker.io/library/busybox:latest""#);
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        let err = serde_json::from_str::<Reference>(r#""Bad""#).unwrap_err();
        assert!(err.to_string().contains("must be lowercase"), "{err}");
    }

    #[test]
    fn familiar_form() {
        let cases = [
            ("busybox", "busybox:latest"),
            ("docker.io/library/busybox:1", "busybox:1"),
            ("someone/app:2", "someone/app:2"),
            ("docker.io/library/a/b:3", "library/a/b:3"),
            ("127.0.0.1:5000/app:4", "127.0.0.1:5000/app:4"),
        ];
        for (input, familiar) in cases {
            assert_eq!(Reference::parse(input).unwrap().familiar(), familiar);
        }
    }

    /// Found by `cargo fuzz run reference` (crates/oci/fuzz): the familiar form of a Docker Hub
    /// repository whose first component has a dot dropped `docker.io/` and re-parsed as an
    /// image on the registry `o.y`.
    #[test]
    fn familiar_form_keeps_docker_hub_when_the_repository_looks_like_a_host() {
        for (input, familiar) in [
            ("docker.io/o.y/t", "docker.io/o.y/t:latest"),
            ("docker.io/localhost/app:1", "docker.io/localhost/app:1"),
            ("docker.io/library/o.y:2", "o.y:2"),
        ] {
            let reference = Reference::parse(input).unwrap();
            assert_eq!(reference.familiar(), familiar, "{input}");
            assert_eq!(Reference::parse(familiar).unwrap(), reference, "{familiar}");
        }
    }

    #[test]
    fn changing_registry_tag_and_digest() {
        let r = Reference::parse("busybox:1.36").unwrap();
        let mirrored = r.with_registry("mirror.local:5000").unwrap();
        assert_eq!(
            mirrored.to_string(),
            "mirror.local:5000/library/busybox:1.36"
        );
        let back = mirrored.with_registry("index.docker.io").unwrap();
        assert_eq!(back, r);
        assert!(r.with_registry("bad host").is_err());
        let local = Reference::parse("localhost:5000/app:1").unwrap();
        let on_hub = local.with_registry("docker.io").unwrap();
        assert_eq!(on_hub.to_string(), "docker.io/library/app:1");
        assert_eq!(Reference::parse(&on_hub.to_string()).unwrap(), on_hub);

        let digest = Digest::parse(D).unwrap();
        let pinned = r.with_digest(digest.clone());
        assert_eq!(pinned.digest(), Some(&digest));
        assert_eq!(pinned.tag(), Some("1.36"));
        let retagged = pinned.with_tag("stable").unwrap();
        assert_eq!(retagged.to_string(), "docker.io/library/busybox:stable");
        assert!(retagged.digest().is_none());
        let err = r.with_tag("no/slash").unwrap_err();
        assert!(matches!(err, ReferenceError::InvalidTag { .. }));
    }
}

//! Platforms (`linux/arm64/v8`) as they appear in image indexes and configs, their
//! normalisation (`x86_64` is `amd64`, `aarch64` is `arm64` with variant `v8`, bare `arm` is
//! `v7`), and the choice of the best manifest in an index for a wanted platform: the host's by
//! default, or the one given with `--custom-platform`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::image::Descriptor;

/// A target platform: operating system, CPU architecture and its variant.
///
/// Field names and JSON keys follow the OCI image index spec (`os.version`, `os.features`).
/// Values are kept as written; comparisons go through [`Platform::normalized`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture in Go's `GOARCH` spelling, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// Operating system in Go's `GOOS` spelling, e.g. `linux`, `windows`.
    pub os: String,
    /// Operating system version, used by Windows images (`10.0.17763.1879`).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// Operating system features the image requires, e.g. `win32k`.
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    /// CPU variant, e.g. `v7` for 32-bit ARM or `v8` for arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// Why a platform string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {0:?}: expected OS/ARCH[/VARIANT][:OS_VERSION], e.g. linux/arm64/v8")]
pub struct PlatformError(pub String);

impl Platform {
    /// A platform without variant or OS version.
    pub fn new(os: &str, architecture: &str) -> Platform {
        Platform {
            architecture: architecture.to_owned(),
            os: os.to_owned(),
            ..Platform::default()
        }
    }

    /// This platform with `variant` set.
    pub fn with_variant(mut self, variant: &str) -> Platform {
        self.variant = Some(variant.to_owned());
        self
    }

    /// Parses `os/arch[/variant]` optionally followed by `:os_version` (the syntax of
    /// `--custom-platform` and `docker --platform`). The result is normalised.
    pub fn parse(input: &str) -> Result<Platform, PlatformError> {
        let err = || PlatformError(input.to_owned());
        let trimmed = input.trim();
        let (spec, os_version) = match trimmed.split_once(':') {
            Some((spec, version)) if !version.is_empty() => (spec, Some(version.to_owned())),
            Some(_) => return Err(err()),
            None => (trimmed, None),
        };
        let parts: Vec<&str> = spec.split('/').collect();
        let valid_part = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(valid_part) {
            return Err(err());
        }
        let platform = Platform {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
            os_version,
            os_features: Vec::new(),
        };
        Ok(platform.normalized())
    }

    /// The platform of the machine Kiln runs on, the default target when none is given.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86" => "386",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "mips64" if cfg!(target_endian = "little") => "mips64le",
            "mips" if cfg!(target_endian = "little") => "mipsle",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform::new(std::env::consts::OS, arch).normalized()
    }

    /// The canonical spelling: lowercase, architecture aliases resolved, and the implied
    /// variant filled in (`arm64` → `v8`, `arm` → `v7`; the `v1` of `amd64` is dropped) so
    /// that equal platforms compare equal.
    pub fn normalized(&self) -> Platform {
        let os = match self.os.to_ascii_lowercase().as_str() {
            "macos" => "darwin".to_owned(),
            other => other.to_owned(),
        };
        let variant = self
            .variant
            .as_deref()
            .map(|v| v.to_ascii_lowercase())
            .filter(|v| !v.is_empty());
        // Prefix first, then compare: `1` and `8.0` must reach the same spelling as `v1` and
        // `v8` in one pass, or normalising twice would differ from normalising once.
        let prefixed = variant.as_deref().map(with_v_prefix);
        let (architecture, variant) = match self.architecture.to_ascii_lowercase().as_str() {
            "i386" | "i686" | "386" => ("386".to_owned(), variant),
            "x86_64" | "x86-64" | "amd64" => ("amd64".to_owned(), prefixed.filter(|v| v != "v1")),
            "aarch64" | "arm64" => {
                let variant = match prefixed.as_deref() {
                    None | Some("v8" | "v8.0") => "v8".to_owned(),
                    Some("v9" | "v9.0") => "v9".to_owned(),
                    Some(other) => other.to_owned(),
                };
                ("arm64".to_owned(), Some(variant))
            }
            "armhf" => ("arm".to_owned(), Some("v7".to_owned())),
            "armel" => ("arm".to_owned(), Some("v6".to_owned())),
            "arm" => (
                "arm".to_owned(),
                Some(prefixed.unwrap_or_else(|| "v7".to_owned())),
            ),
            other => (other.to_owned(), variant),
        };
        Platform {
            architecture,
            os,
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
            variant,
        }
    }

    /// How well an image for `candidate` suits a build for `self`: `None` if it can't run,
    /// `Some(0)` for an exact match, larger for older compatible variants (an `arm/v6` image
    /// on `arm/v7`, an `amd64` image on `amd64/v3`).
    pub fn compatibility(&self, candidate: &Platform) -> Option<u32> {
        let wanted = self.normalized();
        let offered = candidate.normalized();
        if wanted.os != offered.os || wanted.architecture != offered.architecture {
            return None;
        }
        if let (Some(w), Some(o)) = (&wanted.os_version, &offered.os_version) {
            // Windows images only run on the same major.minor.build.
            let build = |v: &str| v.split('.').take(3).collect::<Vec<_>>().join(".");
            if build(w) != build(o) {
                return None;
            }
        }
        if !offered
            .os_features
            .iter()
            .all(|f| wanted.os_features.contains(f))
        {
            return None;
        }
        if wanted.variant == offered.variant {
            return Some(0);
        }
        let default_level = if wanted.architecture == "amd64" {
            Some(1.0)
        } else {
            None
        };
        let level = |v: &Option<String>| match v {
            Some(v) => v.strip_prefix('v').and_then(|n| n.parse::<f32>().ok()),
            None => default_level,
        };
        match (level(&wanted.variant), level(&offered.variant)) {
            (Some(w), Some(o)) if o < w => Some(1 + ((w - o) * 10.0) as u32),
            _ => None,
        }
    }

    /// Whether an image for `candidate` can run on `self` (see [`Platform::compatibility`]).
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.compatibility(candidate).is_some()
    }

    /// The best manifest for this platform among an index's entries: the most compatible
    /// one, the first on ties. Entries without a platform are taken only when no entry
    /// matches, as single-image indexes (e.g. an OCI layout's `index.json`) often omit it.
    pub fn select<'a, I>(&self, manifests: I) -> Option<&'a Descriptor>
    where
        I: IntoIterator<Item = &'a Descriptor>,
    {
        let mut best: Option<(u32, &Descriptor)> = None;
        let mut unplatformed = None;
        for descriptor in manifests {
            match &descriptor.platform {
                Some(platform) => {
                    if let Some(rank) = self.compatibility(platform) {
                        if best.is_none_or(|(best_rank, _)| rank < best_rank) {
                            best = Some((rank, descriptor));
                        }
                    }
                }
                None if descriptor.media_type.is_manifest() || descriptor.media_type.is_index() => {
                    unplatformed.get_or_insert(descriptor);
                }
                None => {}
            }
        }
        best.map(|(_, d)| d).or(unplatformed)
    }
}

fn with_v_prefix(variant: &str) -> String {
    if variant.starts_with('v') {
        variant.to_owned()
    } else {
        format!("v{variant}")
    }
}

impl fmt::Display for Platform {
    /// `os/arch[/variant][:os_version]`, the form [`Platform::parse`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        if let Some(version) = &self.os_version {
            write!(f, ":{version}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::media_type::MediaType;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn parse_and_normalise() {
        let cases = [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("Linux/AMD64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/arm64", "linux/arm64/v8"),
            ("linux/aarch64", "linux/arm64/v8"),
            ("linux/arm64/8", "linux/arm64/v8"),
            ("linux/arm64/v8", "linux/arm64/v8"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/i386", "linux/386"),
            ("linux/ppc64le", "linux/ppc64le"),
            (
                "windows/amd64:10.0.17763.1879",
                "windows/amd64:10.0.17763.1879",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(p(input).to_string(), expected, "{input}");
        }
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "a/b/c/d",
            "linux/amd64:",
            "linux/am d64",
        ] {
            let err = Platform::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    /// Reported by an earlier fuzzing attempt; the `reference` fuzz target (crates/oci/fuzz)
    /// fails on these inputs without the fix: a variant without its `v` was compared before
    /// being prefixed, so `amd64/1` normalised to `v1` (dropped only by a second pass) and
    /// `arm64/8.0` to `v8.0`.
    #[test]
    fn normalising_is_idempotent_for_unprefixed_variants() {
        for (input, expected) in [
            ("linux/amd64/1", "linux/amd64"),
            ("linux/x86_64/V1", "linux/amd64"),
            ("linux/arm64/8.0", "linux/arm64/v8"),
            ("linux/aarch64/9.0", "linux/arm64/v9"),
            ("linux/arm64/9", "linux/arm64/v9"),
            ("linux/arm/7", "linux/arm/v7"),
        ] {
            let once = p(input);
            assert_eq!(once.to_string(), expected, "{input}");
            assert_eq!(once.normalized(), once, "{input}");
        }
        let from_json = Platform {
            variant: Some("1".to_owned()),
            ..Platform::new("linux", "amd64")
        };
        assert_eq!(from_json.normalized().normalized(), from_json.normalized());
    }

    #[test]
    fn host_is_normalised() {
        let host = Platform::host();
        assert_eq!(host, host.normalized());
        assert!(!host.os.is_empty() && !host.architecture.is_empty());
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        assert_eq!(host.to_string(), "linux/amd64");
    }

    #[test]
    fn matching_rules() {
        // Aliases and implied variants match both ways.
        assert_eq!(
            p("linux/arm64").compatibility(&Platform::new("linux", "arm64")),
            Some(0)
        );
        assert!(Platform::new("linux", "aarch64").matches(&p("linux/arm64/v8")));
        assert!(Platform::new("linux", "x86_64").matches(&Platform::new("linux", "amd64")));
        // Older variants run on newer CPUs, not the reverse; exact beats compatible.
        let v7 = p("linux/arm/v7");
        assert_eq!(v7.compatibility(&p("linux/arm/v7")), Some(0));
        let v6 = v7.compatibility(&p("linux/arm/v6")).unwrap();
        let v5 = v7.compatibility(&p("linux/arm/v5")).unwrap();
        assert!(0 < v6 && v6 < v5);
        assert!(!p("linux/arm/v6").matches(&v7));
        assert!(p("linux/amd64/v3").matches(&p("linux/amd64")));
        assert!(!p("linux/amd64").matches(&p("linux/amd64/v3")));
        // Different OS or architecture never match.
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
        assert!(!p("linux/arm64").matches(&p("linux/arm/v7")));
        assert!(!p("linux/amd64").matches(&p("linux/386")));
        // Windows builds must agree.
        let win = p("windows/amd64:10.0.17763.1");
        assert!(win.matches(&p("windows/amd64:10.0.17763.2")));
        assert!(!win.matches(&p("windows/amd64:10.0.20348.1")));
        // An image that needs an OS feature the target lacks does not match.
        let mut needs_feature = p("windows/amd64");
        needs_feature.os_features.push("win32k".into());
        assert!(!p("windows/amd64").matches(&needs_feature));
    }

    fn descriptor(n: u8, platform: Option<&str>) -> Descriptor {
        let mut d = Descriptor::new(
            MediaType::OciManifest,
            Digest::sha256_of(&[n]),
            100 + u64::from(n),
        );
        d.platform = platform.map(|s| {
            // Index entries are written un-normalised by many tools.
            let parts: Vec<&str> = s.split('/').collect();
            let mut platform = Platform::new(parts[0], parts[1]);
            platform.variant = parts.get(2).map(|v| (*v).to_owned());
            platform
        });
        d
    }

    #[test]
    fn selects_best_manifest_in_index() {
        let index = vec![
            descriptor(1, Some("linux/amd64")),
            descriptor(2, Some("linux/arm/v5")),
            descriptor(3, Some("linux/arm/v6")),
            descriptor(4, Some("linux/arm64")),
            descriptor(5, Some("unknown/unknown")),
            descriptor(6, Some("linux/arm/v7")),
        ];
        let pick = |s: &str| p(s).select(&index).map(|d| d.size);
        assert_eq!(pick("linux/amd64"), Some(101));
        assert_eq!(pick("linux/arm64/v8"), Some(104));
        assert_eq!(pick("linux/arm/v7"), Some(106));
        assert_eq!(pick("linux/arm/v6"), Some(103));
        assert_eq!(pick("linux/s390x"), None);
        // Index entries without a platform are a fallback only.
        let with_unplatformed = vec![descriptor(7, None), descriptor(1, Some("linux/amd64"))];
        assert_eq!(
            p("linux/amd64").select(&with_unplatformed).unwrap().size,
            101
        );
        assert_eq!(
            p("linux/arm64").select(&with_unplatformed).unwrap().size,
            107
        );
    }

    #[test]
    fn serde_uses_spec_keys() {
        let json = r#"{"architecture":"arm64","os":"linux","variant":"v8","os.version":"1","os.features":["x"]}"#;
        let platform: Platform = serde_json::from_str(json).unwrap();
        assert_eq!(platform.os_version.as_deref(), Some("1"));
        assert_eq!(platform.os_features, vec!["x".to_owned()]);
        let minimal = serde_json::to_string(&Platform::new("linux", "amd64")).unwrap();
        assert_eq!(minimal, r#"{"architecture":"amd64","os":"linux"}"#);
    }
}

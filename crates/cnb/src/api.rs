//! Buildpack and Platform API versions.

use std::fmt;
use std::str::FromStr;

/// A CNB API version (`<major>.<minor>`, or `<major>` meaning `<major>.0`), ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Api {
    /// The major version.
    pub major: u64,
    /// The minor version.
    pub minor: u64,
}

impl Api {
    /// The oldest Buildpack API Kiln runs buildpacks of.
    pub const MIN_BUILDPACK: Api = Api::new(0, 7);
    /// The newest Buildpack API Kiln runs buildpacks of.
    pub const MAX_BUILDPACK: Api = Api::new(0, 12);
    /// The Platform API whose files (metadata.toml, labels, launcher behaviour) Kiln writes.
    pub const PLATFORM: Api = Api::new(0, 12);

    /// The version `major.minor`.
    pub const fn new(major: u64, minor: u64) -> Api {
        Api { major, minor }
    }

    /// Whether Kiln can run a buildpack declaring this Buildpack API.
    pub fn is_supported_buildpack_api(self) -> bool {
        (Api::MIN_BUILDPACK..=Api::MAX_BUILDPACK).contains(&self)
    }

    /// Whether this version is `major.minor` or newer.
    pub fn at_least(self, major: u64, minor: u64) -> bool {
        self >= Api::new(major, minor)
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A version string that is not `<major>[.<minor>]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an API version (it must be <major>.<minor> or <major>)")]
pub struct ApiParseError(pub String);

impl FromStr for Api {
    type Err = ApiParseError;

    fn from_str(s: &str) -> Result<Api, ApiParseError> {
        let err = || ApiParseError(s.to_owned());
        let (major, minor) = s.split_once('.').unwrap_or((s, "0"));
        let number = |part: &str| -> Result<u64, ApiParseError> {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            part.parse().map_err(|_| err())
        };
        Ok(Api::new(number(major)?, number(minor)?))
    }
}

impl serde::Serialize for Api {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Api {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Api, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_versions() {
        assert_eq!("0.10".parse::<Api>().unwrap(), Api::new(0, 10));
        assert_eq!("1".parse::<Api>().unwrap(), Api::new(1, 0));
        assert!(Api::new(0, 9) < Api::new(0, 10));
        for bad in ["", "0.", ".1", "0.1.2", "a.b", "-1"] {
            assert!(bad.parse::<Api>().is_err(), "{bad}");
        }
    }

    #[test]
    fn supported_range_is_0_7_to_0_12() {
        assert!(!Api::new(0, 6).is_supported_buildpack_api());
        assert!(Api::new(0, 7).is_supported_buildpack_api());
        assert!(Api::new(0, 12).is_supported_buildpack_api());
        assert!(!Api::new(0, 13).is_supported_buildpack_api());
        assert!(!Api::new(1, 0).is_supported_buildpack_api());
    }
}

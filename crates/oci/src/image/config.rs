//! The image configuration document: the container config a runtime starts from, the
//! rootfs diff IDs and the history. Apart from the distribution documents (manifest, index)
//! because it is the one document builds edit step by step rather than assemble once.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{null_as_default, ImageError, JsonBlob};
use crate::digest::Digest;
use crate::media_type::ImageFormat;
use crate::platform::Platform;

/// The container configuration inside an image config (`config` key): what a runtime uses to
/// start the container. Keys are Docker's; the OCI spec uses the same names for its subset.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// `USER`: user (and group) to run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `EXPOSE`: ports as `80/tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "object_keys")]
    pub exposed_ports: Option<BTreeSet<String>>,
    /// `ENV`: `NAME=value` entries in definition order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `VOLUME`: mount point paths.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "object_keys")]
    pub volumes: Option<BTreeSet<String>>,
    /// `WORKDIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `LABEL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// `STOPSIGNAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Windows: whether `Cmd`/`Entrypoint` are already escaped as one command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_escaped: Option<bool>,
    /// `HEALTHCHECK` (Docker only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// `ONBUILD` triggers (Docker only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    /// `SHELL` (Docker only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    /// Keys neither spec defines (e.g. `Hostname`, `AttachStdin` in Docker's output), kept as
    /// read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl ContainerConfig {
    /// The value of environment variable `name`, if set.
    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env.as_ref()?.iter().find_map(|entry| {
            let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
            (key == name).then_some(value)
        })
    }

    /// Sets environment variable `name`, replacing an earlier value in place (as `ENV` does).
    pub fn set_env_var(&mut self, name: &str, value: &str) {
        let entry = format!("{name}={value}");
        let env = self.env.get_or_insert_with(Vec::new);
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == name)
        {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
    }
}

/// Docker's `HEALTHCHECK` settings. Durations are nanoseconds, as Docker stores them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", command]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Vec<String>>,
    /// Time between checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Time after which a check is considered hung.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Grace period after start during which failures don't count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<i64>,
    /// Time between checks during the start period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<i64>,
    /// Consecutive failures before the container is unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
}

/// One entry of an image's history: the step that made a layer, or a metadata-only step.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct History {
    /// When the step ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The instruction, e.g. `RUN /bin/sh -c make`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Who made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// A free-form comment, e.g. the builder's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// True when the step produced no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// The layers an image's filesystem is made of, as uncompressed digests (diff IDs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Digest of each layer's uncompressed tar, bottom first.
    #[serde(default, deserialize_with = "null_as_default")]
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            fs_type: "layers".to_owned(),
            diff_ids: Vec::new(),
        }
    }
}

/// An image configuration (the config blob): platform, runtime settings, layer diff IDs and
/// history. The same document serves OCI and Docker; only its media type differs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    /// When the image was made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Who made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// CPU architecture (`amd64`, ...).
    pub architecture: String,
    /// Operating system (`linux`, ...).
    pub os: String,
    /// Operating system version (Windows).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// Required operating system features (Windows).
    #[serde(
        rename = "os.features",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub os_features: Vec<String>,
    /// CPU variant (`v8`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Runtime settings.
    #[serde(default, deserialize_with = "null_as_default")]
    pub config: ContainerConfig,
    /// The layers' diff IDs.
    #[serde(default, deserialize_with = "null_as_default")]
    pub rootfs: RootFs,
    /// One entry per build step, including steps without a layer.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub history: Vec<History>,
    /// Keys neither spec defines (Docker's `container_config`, `docker_version`, ...), kept
    /// as read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl ImageConfig {
    /// An empty config (no layers, no settings) for `platform`, the start of a `FROM scratch`
    /// build.
    pub fn new(platform: &Platform) -> ImageConfig {
        ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            os_version: platform.os_version.clone(),
            os_features: platform.os_features.clone(),
            variant: platform.variant.clone(),
            ..ImageConfig::default()
        }
    }

    /// Parses a config blob (OCI or Docker).
    pub fn from_json(bytes: &[u8]) -> Result<ImageConfig, ImageError> {
        serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
            what: "image config",
            source,
        })
    }

    /// The platform the image is for.
    pub fn platform(&self) -> Platform {
        Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
            variant: self.variant.clone(),
        }
    }

    /// Records a step that added the layer with uncompressed digest `diff_id`.
    pub fn push_layer(&mut self, diff_id: Digest, mut history: History) {
        history.empty_layer = false;
        self.rootfs.diff_ids.push(diff_id);
        self.history.push(history);
    }

    /// Records a step that changed only metadata (`ENV`, `CMD`, ...).
    pub fn push_empty_layer_history(&mut self, mut history: History) {
        history.empty_layer = true;
        self.history.push(history);
    }

    /// The canonical config blob with the config media type of `format`.
    pub fn to_blob(&self, format: ImageFormat) -> Result<JsonBlob, ImageError> {
        JsonBlob::new(self, format.config_type(), "image config")
    }
}

/// Formats seconds since the Unix epoch as an RFC 3339 UTC timestamp
/// (`2024-01-02T03:04:05Z`), the form of `created` fields, e.g. from `SOURCE_DATE_EPOCH`.
/// Times beyond what RFC 3339 can write (years outside 0000–9999) are clamped to its range.
pub fn rfc3339_utc(unix_seconds: i64) -> String {
    let clamped = if unix_seconds < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    };
    let time = jiff::Timestamp::from_second(unix_seconds).unwrap_or(clamped);
    // Whole seconds: `created` fields carry no fraction.
    format!("{:.0}", time)
}

/// (De)serialises a set of strings as a JSON object whose values are `{}`, the shape of
/// `ExposedPorts` and `Volumes`.
mod object_keys {
    use std::collections::{BTreeMap, BTreeSet};

    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(
        set: &Option<BTreeSet<String>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Empty {}
        match set {
            None => serializer.serialize_none(),
            Some(set) => {
                let mut map = serializer.serialize_map(Some(set.len()))?;
                for key in set {
                    map.serialize_entry(key, &Empty {})?;
                }
                map.end()
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<BTreeSet<String>>, D::Error> {
        let map = Option::<BTreeMap<String, Value>>::deserialize(deserializer)?;
        Ok(map.map(|m| m.into_keys().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests::sample_config;
    use crate::media_type::MediaType;

    #[test]
    fn config_bytes_do_not_depend_on_insertion_order() {
        let a = sample_config(false).to_blob(ImageFormat::Oci).unwrap();
        let b = sample_config(true).to_blob(ImageFormat::Oci).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.media_type, MediaType::OciConfig);
        let text = String::from_utf8(a.bytes).unwrap();
        assert!(!text.contains('\n'));
        assert!(text.starts_with(r#"{"architecture":"arm64","config":{"Env":["PATH=/usr/bin:/bin"],"ExposedPorts":{"443/tcp":{},"53/udp":{},"80/tcp":{}},"Healthcheck":{"Interval":30000000000,"Test":["CMD-SHELL","true"]},"Labels":{"label0":"v0""#), "{text}");
    }

    #[test]
    fn docker_config_round_trips_docker_only_and_unknown_fields() {
        let docker = r#"{
          "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05.123456789Z",
          "docker_version": "24.0.5",
          "container_config": {"Hostname": "abc", "Cmd": ["/bin/sh"]},
          "config": {
            "Hostname": "", "AttachStdin": false, "User": "app:app",
            "ExposedPorts": {"8080/tcp": {}}, "Env": ["A=1", "B=x=y"],
            "Cmd": null, "Entrypoint": ["/entry"], "Volumes": {"/data": {}},
            "WorkingDir": "/srv", "Labels": {"a": "b"}, "StopSignal": "SIGTERM",
            "ArgsEscaped": true, "OnBuild": ["RUN echo child"], "Shell": ["/bin/bash", "-c"],
            "Healthcheck": {"Test": ["CMD", "true"], "Interval": 1, "Timeout": 2,
                            "StartPeriod": 3, "StartInterval": 4, "Retries": 5}
          },
          "rootfs": {"type": "layers", "diff_ids": ["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
          "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "/bin/sh", "empty_layer": true}, {"comment": "x"}]
        }"#;
        let config = ImageConfig::from_json(docker.as_bytes()).unwrap();
        assert_eq!(config.config.user.as_deref(), Some("app:app"));
        assert_eq!(config.config.env_var("B"), Some("x=y"));
        assert_eq!(
            config.config.on_build.as_ref().unwrap()[0],
            "RUN echo child"
        );
        assert_eq!(config.config.shell.as_ref().unwrap()[0], "/bin/bash");
        assert_eq!(
            config.config.healthcheck.as_ref().unwrap().start_interval,
            Some(4)
        );
        assert_eq!(
            config.config.extra["Hostname"],
            Value::String(String::new())
        );
        assert_eq!(
            config.extra["docker_version"],
            Value::String("24.0.5".into())
        );
        assert!(config.history[0].empty_layer);
        assert_eq!(config.rootfs.diff_ids.len(), 1);

        let blob = config.to_blob(ImageFormat::Docker).unwrap();
        assert_eq!(blob.media_type, MediaType::DockerConfig);
        let again = ImageConfig::from_json(&blob.bytes).unwrap();
        assert_eq!(again, config);
        assert_eq!(
            again.to_blob(ImageFormat::Docker).unwrap().bytes,
            blob.bytes
        );
    }

    #[test]
    fn env_var_replacement_keeps_position() {
        let mut c = ContainerConfig::default();
        c.set_env_var("A", "1");
        c.set_env_var("B", "2");
        c.set_env_var("A", "3");
        assert_eq!(c.env, Some(vec!["A=3".to_owned(), "B=2".to_owned()]));
        assert_eq!(c.env_var("C"), None);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(4_102_444_800), "2100-01-01T00:00:00Z");
    }
}

//! The JSON documents of an image: configuration, manifest and index, with builders that
//! produce them in OCI or Docker schema 2 form and serialise them canonically.
//!
//! These are Kiln's own serde types rather than `oci-spec`'s: maps are `BTreeMap`s so the
//! bytes (and so the digests) never depend on hash order, the Docker-only configuration fields
//! (`Healthcheck`, `OnBuild`, `Shell`) are modelled, and fields neither spec names are kept in
//! `extra` maps so a base image's config round-trips without loss.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical;
use crate::digest::Digest;
use crate::media_type::{ImageFormat, MediaType};
use crate::platform::Platform;

/// The annotation naming a manifest's tag in an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation giving an image's creation time (RFC 3339).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// The annotation naming the base image a build started from.
pub const ANNOTATION_BASE_NAME: &str = "org.opencontainers.image.base.name";
/// The annotation giving the digest of the base image's manifest.
pub const ANNOTATION_BASE_DIGEST: &str = "org.opencontainers.image.base.digest";

/// Why an image document could not be read or built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The bytes are not a valid document of the expected kind.
    #[error("invalid {what} JSON: {source}")]
    Json {
        /// Which document: "image config", "manifest" or "index".
        what: &'static str,
        /// The parse error, with line and column.
        source: serde_json::Error,
    },
    /// A Docker schema 1 manifest, which has no config blob and which Kiln does not support.
    #[error("Docker image manifest schema 1 ({0}) is not supported; push the image again with a current client to get schema 2")]
    Schema1(String),
    /// A manifest whose media type is neither a manifest nor an index.
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    /// A manifest was built without a config.
    #[error("manifest has no config descriptor")]
    MissingConfig,
    /// A descriptor's media type has no equivalent in the requested format.
    #[error("{media_type} ({digest}) cannot be written in a {format:?} manifest")]
    NotInFormat {
        /// The blob that can't be converted.
        digest: Digest,
        /// Its media type.
        media_type: MediaType,
        /// The target format.
        format: ImageFormat,
    },
    /// A descriptor passed as a layer is not a layer.
    #[error("{digest} has media type {media_type}, which is not a layer type")]
    NotALayer {
        /// The blob passed as a layer.
        digest: Digest,
        /// Its media type.
        media_type: MediaType,
    },
}

/// A reference to a blob: its media type, digest and size, and optional platform, URLs and
/// annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// What the blob is.
    #[serde(rename = "mediaType")]
    pub media_type: MediaType,
    /// The blob's content digest.
    pub digest: Digest,
    /// The blob's size in bytes.
    pub size: u64,
    /// Where a foreign layer can be downloaded from.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub urls: Vec<String>,
    /// Free-form metadata, e.g. [`ANNOTATION_REF_NAME`].
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// The platform of a manifest listed in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// The artifact type of a manifest listed in an index.
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<MediaType>,
    /// The blob's content inlined as base64, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl Descriptor {
    /// The content embedded in the `data` field, when it is there and matches the descriptor's
    /// size and digest; anything else is `None`, and the reader fetches the blob instead, as
    /// the image spec asks of content that fails verification.
    pub fn embedded_data(&self) -> Option<Vec<u8>> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.data.as_deref()?)
            .ok()?;
        let mut hasher = self.digest.hasher();
        hasher.update(&bytes);
        (bytes.len() as u64 == self.size && hasher.finish() == self.digest).then_some(bytes)
    }

    /// A descriptor with no platform, URLs or annotations.
    pub fn new(media_type: MediaType, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type,
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            platform: None,
            artifact_type: None,
            data: None,
        }
    }

    /// The annotation `key`, if set.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// A serialised JSON document (config, manifest or index) ready to be stored or pushed: its
/// canonical bytes, digest and media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonBlob {
    /// The canonical JSON bytes; these are what the digest covers.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`.
    pub digest: Digest,
    /// The document's media type.
    pub media_type: MediaType,
}

impl JsonBlob {
    fn new<T: Serialize>(
        value: &T,
        media_type: MediaType,
        what: &'static str,
    ) -> Result<JsonBlob, ImageError> {
        let (bytes, digest) = canonical::to_vec_with_digest(value)
            .map_err(|source| ImageError::Json { what, source })?;
        Ok(JsonBlob {
            bytes,
            digest,
            media_type,
        })
    }

    /// A descriptor pointing at this blob.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest.clone(),
            self.bytes.len() as u64,
        )
    }

    /// A descriptor pointing at this blob that also carries it (the OCI descriptor's `data`
    /// field), so a reader of the manifest needs no second request for it. The blob must still
    /// be stored: readers that ignore `data` fetch it.
    pub fn descriptor_with_data(&self) -> Descriptor {
        let mut descriptor = self.descriptor();
        descriptor.data = Some(base64::engine::general_purpose::STANDARD.encode(&self.bytes));
        descriptor
    }
}

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

/// A single-platform image manifest: config and layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The manifest's own media type (required by Docker, recommended by OCI).
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<MediaType>,
    /// For artifacts: what the manifest describes.
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<MediaType>,
    /// The config blob.
    pub config: Descriptor,
    /// Layer blobs, bottom first.
    #[serde(default, deserialize_with = "null_as_default")]
    pub layers: Vec<Descriptor>,
    /// The manifest this one refers to (signatures, attestations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Box<Descriptor>>,
    /// Free-form metadata (OCI only; Docker ignores it).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// Parses a manifest document.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ImageError> {
        serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
            what: "manifest",
            source,
        })
    }

    /// Docker when the manifest or its config has a Docker media type, OCI otherwise.
    pub fn format(&self) -> ImageFormat {
        let media_type = self.media_type.as_ref().unwrap_or(&self.config.media_type);
        if media_type.is_docker() {
            ImageFormat::Docker
        } else {
            ImageFormat::Oci
        }
    }

    /// The canonical manifest blob.
    pub fn to_blob(&self) -> Result<JsonBlob, ImageError> {
        let media_type = self
            .media_type
            .clone()
            .unwrap_or_else(|| self.format().manifest_type());
        JsonBlob::new(self, media_type, "manifest")
    }
}

/// Builds a [`Manifest`] in one format, converting the media types of configs and layers
/// taken from images of the other format.
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    format: ImageFormat,
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
    annotations: BTreeMap<String, String>,
    subject: Option<Descriptor>,
}

impl ManifestBuilder {
    /// A builder for a manifest in `format`.
    pub fn new(format: ImageFormat) -> ManifestBuilder {
        ManifestBuilder {
            format,
            config: None,
            layers: Vec::new(),
            annotations: BTreeMap::new(),
            subject: None,
        }
    }

    /// Sets the config from its serialised blob.
    pub fn config(mut self, config: &JsonBlob) -> ManifestBuilder {
        self.config = Some(config.descriptor());
        self
    }

    /// Sets the config from a descriptor (e.g. a base image's config reused as is).
    pub fn config_descriptor(mut self, config: Descriptor) -> ManifestBuilder {
        self.config = Some(config);
        self
    }

    /// Appends a layer (bottom first).
    pub fn layer(mut self, layer: Descriptor) -> ManifestBuilder {
        self.layers.push(layer);
        self
    }

    /// Appends layers (bottom first).
    pub fn layers(mut self, layers: impl IntoIterator<Item = Descriptor>) -> ManifestBuilder {
        self.layers.extend(layers);
        self
    }

    /// Sets a manifest annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> ManifestBuilder {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets the subject (the manifest this one refers to).
    pub fn subject(mut self, subject: Descriptor) -> ManifestBuilder {
        self.subject = Some(subject);
        self
    }

    /// The manifest, with every media type converted to the builder's format.
    pub fn build(self) -> Result<Manifest, ImageError> {
        let format = self.format;
        let convert = |mut d: Descriptor| -> Result<Descriptor, ImageError> {
            match d.media_type.in_format(format) {
                Some(media_type) => {
                    d.media_type = media_type;
                    Ok(d)
                }
                None => Err(ImageError::NotInFormat {
                    digest: d.digest,
                    media_type: d.media_type,
                    format,
                }),
            }
        };
        let config = convert(self.config.ok_or(ImageError::MissingConfig)?)?;
        let layers = self
            .layers
            .into_iter()
            .map(|layer| {
                if !layer.media_type.is_layer() {
                    return Err(ImageError::NotALayer {
                        digest: layer.digest,
                        media_type: layer.media_type,
                    });
                }
                convert(layer)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Manifest {
            schema_version: 2,
            media_type: Some(format.manifest_type()),
            artifact_type: None,
            config,
            layers,
            subject: self.subject.map(Box::new),
            annotations: self.annotations,
        })
    }
}

/// A multi-platform index (Docker: manifest list), also the shape of an OCI layout's
/// `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The index's own media type.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<MediaType>,
    /// For artifacts: what the index describes.
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<MediaType>,
    /// The listed manifests (or nested indexes), usually with a platform each.
    #[serde(default, deserialize_with = "null_as_default")]
    pub manifests: Vec<Descriptor>,
    /// The manifest this one refers to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Box<Descriptor>>,
    /// Free-form metadata.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
}

impl Index {
    /// An empty index in `format`.
    pub fn new(format: ImageFormat) -> Index {
        Index {
            schema_version: 2,
            media_type: Some(format.index_type()),
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Parses an index or manifest list.
    pub fn from_json(bytes: &[u8]) -> Result<Index, ImageError> {
        serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
            what: "index",
            source,
        })
    }

    /// Appends a manifest entry, converting its media type to the index's format.
    pub fn push(&mut self, mut manifest: Descriptor) -> Result<(), ImageError> {
        let format = self.format();
        manifest.media_type =
            manifest
                .media_type
                .in_format(format)
                .ok_or_else(|| ImageError::NotInFormat {
                    digest: manifest.digest.clone(),
                    media_type: manifest.media_type.clone(),
                    format,
                })?;
        self.manifests.push(manifest);
        Ok(())
    }

    /// Docker for a manifest list, OCI otherwise.
    pub fn format(&self) -> ImageFormat {
        match &self.media_type {
            Some(t) if t.is_docker() => ImageFormat::Docker,
            _ => ImageFormat::Oci,
        }
    }

    /// The best manifest for `platform` (see [`Platform::select`]).
    pub fn select(&self, platform: &Platform) -> Option<&Descriptor> {
        platform.select(&self.manifests)
    }

    /// The canonical index blob.
    pub fn to_blob(&self) -> Result<JsonBlob, ImageError> {
        let media_type = self
            .media_type
            .clone()
            .unwrap_or_else(|| self.format().index_type());
        JsonBlob::new(self, media_type, "index")
    }
}

/// A manifest document as fetched from a registry or layout: either kind.
// Parsed a few times per build; boxing the larger variant would only make matching clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyManifest {
    /// A single-platform manifest.
    Manifest(Manifest),
    /// A multi-platform index or manifest list.
    Index(Index),
}

impl AnyManifest {
    /// Parses a manifest document, deciding its kind from `content_type` (a registry's
    /// Content-Type or a descriptor's media type) when it names one, else from the document's
    /// `mediaType` field, else from its shape (`manifests` vs `config`).
    pub fn parse(content_type: Option<&str>, bytes: &[u8]) -> Result<AnyManifest, ImageError> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "schemaVersion", default)]
            schema_version: Option<u32>,
            #[serde(rename = "mediaType", default)]
            media_type: Option<String>,
            #[serde(default)]
            manifests: Option<Value>,
            #[serde(default)]
            config: Option<Value>,
        }
        let declared = content_type
            .map(MediaType::parse)
            .filter(|t| t.is_manifest() || t.is_index() || t.is_schema1());
        let probe: Option<Probe> = serde_json::from_slice(bytes).ok();
        let media_type = match (declared, &probe) {
            (Some(t), _) => t,
            (None, Some(p)) => match (&p.media_type, p.schema_version) {
                (Some(t), _) => MediaType::parse(t),
                (None, Some(1)) => MediaType::DockerSchema1Manifest,
                (None, _) if p.manifests.is_some() => MediaType::OciIndex,
                (None, _) if p.config.is_some() => MediaType::OciManifest,
                (None, _) => MediaType::Other(String::new()),
            },
            // Not JSON at all: let the manifest parser report where.
            (None, None) => MediaType::OciManifest,
        };
        if media_type.is_schema1() {
            return Err(ImageError::Schema1(media_type.to_string()));
        }
        if media_type.is_index() {
            Index::from_json(bytes).map(AnyManifest::Index)
        } else if media_type.is_manifest() {
            Manifest::from_json(bytes).map(AnyManifest::Manifest)
        } else {
            Err(ImageError::UnsupportedMediaType(media_type.to_string()))
        }
    }
}

/// Formats seconds since the Unix epoch as an RFC 3339 UTC timestamp
/// (`2024-01-02T03:04:05Z`), the form of `created` fields, e.g. from `SOURCE_DATE_EPOCH`.
pub fn rfc3339_utc(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (era-based arithmetic: 400-year
/// eras have a fixed number of days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468; // days from 0000-03-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Go tools write empty slices and maps as `null`; read that as empty.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
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
    use crate::media_type::Compression;

    fn sample_config(reverse: bool) -> ImageConfig {
        let mut config = ImageConfig::new(&Platform::parse("linux/arm64").unwrap());
        config.created = Some(rfc3339_utc(0));
        let mut labels: Vec<(String, String)> = (0..50)
            .map(|i| (format!("label{i}"), format!("v{i}")))
            .collect();
        let mut ports = vec!["80/tcp", "443/tcp", "53/udp"];
        if reverse {
            labels.reverse();
            ports.reverse();
        }
        config.config.labels = Some(labels.into_iter().collect());
        config.config.exposed_ports = Some(ports.into_iter().map(String::from).collect());
        config.config.set_env_var("PATH", "/usr/bin:/bin");
        config.config.healthcheck = Some(Healthcheck {
            test: Some(vec!["CMD-SHELL".into(), "true".into()]),
            interval: Some(30_000_000_000),
            ..Healthcheck::default()
        });
        config.push_layer(
            Digest::sha256_of(b"layer"),
            History {
                created_by: Some("COPY . /".into()),
                ..History::default()
            },
        );
        config
    }

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
    fn embedded_data_is_used_only_when_it_matches_the_descriptor() {
        let blob = sample_config(false).to_blob(ImageFormat::Oci).unwrap();
        let carrying = blob.descriptor_with_data();
        assert_eq!(carrying.embedded_data().as_deref(), Some(&blob.bytes[..]));
        let json = serde_json::to_value(&carrying).unwrap();
        assert!(json["data"].as_str().is_some_and(|d| !d.is_empty()));
        assert_eq!(blob.descriptor().embedded_data(), None);

        let mut other_content = carrying.clone();
        other_content.data = Some(base64::engine::general_purpose::STANDARD.encode(b"{}"));
        assert_eq!(other_content.embedded_data(), None);
        let mut wrong_size = carrying.clone();
        wrong_size.size += 1;
        assert_eq!(wrong_size.embedded_data(), None);
        let mut not_base64 = carrying;
        not_base64.data = Some("%%%".to_owned());
        assert_eq!(not_base64.embedded_data(), None);
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
    fn manifest_builder_converts_media_types() {
        let config = sample_config(false);
        let layer = Descriptor::new(
            ImageFormat::Oci.layer_type(Compression::Gzip),
            Digest::sha256_of(b"gz"),
            2,
        );
        for format in [ImageFormat::Oci, ImageFormat::Docker] {
            let config_blob = config.to_blob(ImageFormat::Oci).unwrap();
            let manifest = ManifestBuilder::new(format)
                .config(&config_blob)
                .layer(layer.clone())
                .build()
                .unwrap();
            assert_eq!(manifest.media_type, Some(format.manifest_type()));
            assert_eq!(manifest.config.media_type, format.config_type());
            assert_eq!(
                manifest.layers[0].media_type,
                format.layer_type(Compression::Gzip)
            );
            assert_eq!(manifest.format(), format);
            let blob = manifest.to_blob().unwrap();
            assert_eq!(blob.media_type, format.manifest_type());
            match AnyManifest::parse(None, &blob.bytes).unwrap() {
                AnyManifest::Manifest(m) => assert_eq!(m, manifest),
                other => panic!("{other:?}"),
            }
        }
        let err = ManifestBuilder::new(ImageFormat::Oci).build().unwrap_err();
        assert!(matches!(err, ImageError::MissingConfig));
        let config_blob = config.to_blob(ImageFormat::Oci).unwrap();
        let err = ManifestBuilder::new(ImageFormat::Oci)
            .config(&config_blob)
            .layer(config_blob.descriptor())
            .build()
            .unwrap_err();
        assert!(matches!(err, ImageError::NotALayer { .. }), "{err}");
        let foreign = Descriptor::new(MediaType::OciForeignLayer, Digest::sha256_of(b"f"), 1);
        let err = ManifestBuilder::new(ImageFormat::Docker)
            .config(&config_blob)
            .layer(foreign)
            .build()
            .unwrap_err();
        assert!(matches!(err, ImageError::NotInFormat { .. }), "{err}");
    }

    #[test]
    fn any_manifest_detection() {
        let index = r#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            AnyManifest::parse(None, index.as_bytes()).unwrap(),
            AnyManifest::Index(_)
        ));
        assert!(matches!(
            AnyManifest::parse(
                Some("application/vnd.docker.distribution.manifest.list.v2+json"),
                index.as_bytes()
            )
            .unwrap(),
            AnyManifest::Index(_)
        ));
        let schema1 = r#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(matches!(
            AnyManifest::parse(Some("application/json"), schema1.as_bytes()),
            Err(ImageError::Schema1(_))
        ));
        let artifact = r#"{"schemaVersion":2,"mediaType":"application/x-thing"}"#;
        assert!(matches!(
            AnyManifest::parse(None, artifact.as_bytes()),
            Err(ImageError::UnsupportedMediaType(_))
        ));
        let err = AnyManifest::parse(None, b"{not json").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn index_push_and_select() {
        let mut index = Index::new(ImageFormat::Docker);
        let mut arm = Descriptor::new(MediaType::OciManifest, Digest::sha256_of(b"arm"), 1);
        arm.platform = Some(Platform::new("linux", "arm64"));
        let mut amd = Descriptor::new(MediaType::DockerManifest, Digest::sha256_of(b"amd"), 2);
        amd.platform = Some(Platform::new("linux", "amd64"));
        index.push(arm).unwrap();
        index.push(amd).unwrap();
        assert!(index
            .manifests
            .iter()
            .all(|d| d.media_type == MediaType::DockerManifest));
        let chosen = index
            .select(&Platform::parse("linux/aarch64").unwrap())
            .unwrap();
        assert_eq!(chosen.digest, Digest::sha256_of(b"arm"));
        let blob = index.to_blob().unwrap();
        assert_eq!(blob.media_type, MediaType::DockerManifestList);
        assert_eq!(Index::from_json(&blob.bytes).unwrap(), index);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn null_collections_from_go_tools_read_as_empty() {
        let config = r#"{"architecture":"amd64","os":"linux","config":null,"history":null,
            "rootfs":{"type":"layers","diff_ids":null},"os.features":null}"#;
        let config = ImageConfig::from_json(config.as_bytes()).unwrap();
        assert!(config.rootfs.diff_ids.is_empty() && config.history.is_empty());
        let manifest = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json",
            "digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "size":0,"annotations":null,"urls":null},"layers":null,"annotations":null}"#;
        let manifest = Manifest::from_json(manifest.as_bytes()).unwrap();
        assert!(manifest.layers.is_empty());
        let index = Index::from_json(br#"{"schemaVersion":2,"manifests":null}"#).unwrap();
        assert!(index.manifests.is_empty());
    }
}

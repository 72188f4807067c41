//! The JSON documents of an image: configuration, manifest and index, with builders that
//! produce them in OCI or Docker schema 2 form and serialise them canonically.
//!
//! These are Kiln's own serde types rather than `oci-spec`'s: maps are `BTreeMap`s so the
//! bytes (and so the digests) never depend on hash order, the Docker-only configuration fields
//! (`Healthcheck`, `OnBuild`, `Shell`) are modelled, and fields neither spec names are kept in
//! `extra` maps so a base image's config round-trips without loss. The configuration document
//! is in `config`; everything here is re-exported at this path.

mod config;

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical;
use crate::digest::Digest;
use crate::media_type::{ImageFormat, MediaType};
use crate::platform::Platform;

pub use self::config::{rfc3339_utc, ContainerConfig, Healthcheck, History, ImageConfig, RootFs};

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

/// Go tools write empty slices and maps as `null`; read that as empty.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media_type::Compression;

    pub(super) fn sample_config(reverse: bool) -> ImageConfig {
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

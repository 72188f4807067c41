//! Media types of the OCI image spec and of Docker's image manifest v2 schema 2, with the
//! questions callers ask of them: is this a manifest or an index, how is this layer
//! compressed, what is the equivalent type in the other format.
//!
//! Media types that Kiln does not know are kept verbatim ([`MediaType::Other`]) so a manifest
//! carrying an artifact or a vendor layer type round-trips unchanged.

use std::fmt;
use std::str::FromStr;

/// The two manifest families an image can be written in (`--image-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ImageFormat {
    /// OCI image spec media types (`application/vnd.oci.image.*`). The default.
    #[default]
    Oci,
    /// Docker image manifest v2 schema 2 media types (`application/vnd.docker.*`), for
    /// registries and runtimes that predate OCI.
    Docker,
}

impl ImageFormat {
    /// The media type of a single-platform manifest in this format.
    pub fn manifest_type(self) -> MediaType {
        match self {
            ImageFormat::Oci => MediaType::OciManifest,
            ImageFormat::Docker => MediaType::DockerManifest,
        }
    }

    /// The media type of a multi-platform index (Docker: manifest list) in this format.
    pub fn index_type(self) -> MediaType {
        match self {
            ImageFormat::Oci => MediaType::OciIndex,
            ImageFormat::Docker => MediaType::DockerManifestList,
        }
    }

    /// The media type of an image configuration blob in this format.
    pub fn config_type(self) -> MediaType {
        match self {
            ImageFormat::Oci => MediaType::OciConfig,
            ImageFormat::Docker => MediaType::DockerConfig,
        }
    }

    /// The media type of a distributable layer compressed with `compression` in this format.
    pub fn layer_type(self, compression: Compression) -> MediaType {
        match (self, compression) {
            (ImageFormat::Oci, Compression::None) => MediaType::OciLayer,
            (ImageFormat::Oci, Compression::Gzip) => MediaType::OciLayerGzip,
            (ImageFormat::Oci, Compression::Zstd) => MediaType::OciLayerZstd,
            (ImageFormat::Docker, Compression::None) => MediaType::DockerLayer,
            (ImageFormat::Docker, Compression::Gzip) => MediaType::DockerLayerGzip,
            (ImageFormat::Docker, Compression::Zstd) => MediaType::DockerLayerZstd,
        }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// A plain tar stream; its digest is also its diff ID.
    #[default]
    None,
    /// gzip (RFC 1952), the compression every runtime understands.
    Gzip,
    /// Zstandard; smaller and faster, but needs containerd 1.5+/Docker 23+/podman 3+.
    Zstd,
}

impl Compression {
    /// The file name extension conventionally used for a tar with this compression.
    pub fn tar_extension(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "tar.gz",
            Compression::Zstd => "tar.zst",
        }
    }
}

/// A media type of a manifest, index, config or layer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MediaType {
    /// `application/vnd.oci.image.manifest.v1+json`
    OciManifest,
    /// `application/vnd.oci.image.index.v1+json`
    OciIndex,
    /// `application/vnd.oci.image.config.v1+json`
    OciConfig,
    /// `application/vnd.oci.image.layer.v1.tar`
    OciLayer,
    /// `application/vnd.oci.image.layer.v1.tar+gzip`
    OciLayerGzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`
    OciLayerZstd,
    /// `application/vnd.oci.image.layer.nondistributable.v1.tar` (deprecated in the spec, still
    /// found in Windows images)
    OciForeignLayer,
    /// `application/vnd.oci.image.layer.nondistributable.v1.tar+gzip`
    OciForeignLayerGzip,
    /// `application/vnd.oci.image.layer.nondistributable.v1.tar+zstd`
    OciForeignLayerZstd,
    /// `application/vnd.oci.empty.v1+json`, the `{}` config of artifacts.
    OciEmpty,
    /// `application/vnd.docker.distribution.manifest.v2+json`
    DockerManifest,
    /// `application/vnd.docker.distribution.manifest.list.v2+json`
    DockerManifestList,
    /// `application/vnd.docker.container.image.v1+json`
    DockerConfig,
    /// `application/vnd.docker.image.rootfs.diff.tar` (uncompressed; not in the schema 2 text
    /// but used by containerd and go-containerregistry)
    DockerLayer,
    /// `application/vnd.docker.image.rootfs.diff.tar.gzip`
    DockerLayerGzip,
    /// `application/vnd.docker.image.rootfs.diff.tar.zstd` (containerd's name)
    DockerLayerZstd,
    /// `application/vnd.docker.image.rootfs.foreign.diff.tar.gzip`
    DockerForeignLayerGzip,
    /// `application/vnd.docker.distribution.manifest.v1+json`, the retired schema 1.
    DockerSchema1Manifest,
    /// `application/vnd.docker.distribution.manifest.v1+prettyjws`, signed schema 1.
    DockerSchema1SignedManifest,
    /// Any other media type, kept verbatim.
    Other(String),
}

/// Every known media type with its string, for parsing and printing.
const KNOWN: &[(MediaType, &str)] = &[
    (
        MediaType::OciManifest,
        "application/vnd.oci.image.manifest.v1+json",
    ),
    (
        MediaType::OciIndex,
        "application/vnd.oci.image.index.v1+json",
    ),
    (
        MediaType::OciConfig,
        "application/vnd.oci.image.config.v1+json",
    ),
    (
        MediaType::OciLayer,
        "application/vnd.oci.image.layer.v1.tar",
    ),
    (
        MediaType::OciLayerGzip,
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ),
    (
        MediaType::OciLayerZstd,
        "application/vnd.oci.image.layer.v1.tar+zstd",
    ),
    (
        MediaType::OciForeignLayer,
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
    ),
    (
        MediaType::OciForeignLayerGzip,
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ),
    (
        MediaType::OciForeignLayerZstd,
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    ),
    (MediaType::OciEmpty, "application/vnd.oci.empty.v1+json"),
    (
        MediaType::DockerManifest,
        "application/vnd.docker.distribution.manifest.v2+json",
    ),
    (
        MediaType::DockerManifestList,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ),
    (
        MediaType::DockerConfig,
        "application/vnd.docker.container.image.v1+json",
    ),
    (
        MediaType::DockerLayer,
        "application/vnd.docker.image.rootfs.diff.tar",
    ),
    (
        MediaType::DockerLayerGzip,
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ),
    (
        MediaType::DockerLayerZstd,
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
    ),
    (
        MediaType::DockerForeignLayerGzip,
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ),
    (
        MediaType::DockerSchema1Manifest,
        "application/vnd.docker.distribution.manifest.v1+json",
    ),
    (
        MediaType::DockerSchema1SignedManifest,
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ),
];

impl MediaType {
    /// The `Accept` header value a registry client sends when fetching a manifest by tag, so the
    /// registry answers with any supported manifest or index rather than converting to schema 1.
    pub const MANIFEST_ACCEPT: &'static str = "application/vnd.oci.image.index.v1+json, \
         application/vnd.docker.distribution.manifest.list.v2+json, \
         application/vnd.oci.image.manifest.v1+json, \
         application/vnd.docker.distribution.manifest.v2+json";

    /// Parses a media type string. Parameters after `;` (e.g. `; charset=utf-8` in a
    /// Content-Type header) and surrounding whitespace are ignored for known types.
    pub fn parse(s: &str) -> MediaType {
        let essence = s.split(';').next().unwrap_or("").trim();
        KNOWN
            .iter()
            .find(|(_, name)| name.eq_ignore_ascii_case(essence))
            .map(|(t, _)| t.clone())
            .unwrap_or_else(|| MediaType::Other(s.to_owned()))
    }

    /// The media type string.
    pub fn as_str(&self) -> &str {
        match self {
            MediaType::Other(s) => s,
            known => KNOWN
                .iter()
                .find(|(t, _)| t == known)
                .map(|(_, name)| *name)
                .expect("every known variant is listed in KNOWN"),
        }
    }

    /// Whether this is a single-platform image manifest (OCI or Docker schema 2).
    pub fn is_manifest(&self) -> bool {
        matches!(self, MediaType::OciManifest | MediaType::DockerManifest)
    }

    /// Whether this is a multi-platform index or Docker manifest list.
    pub fn is_index(&self) -> bool {
        matches!(self, MediaType::OciIndex | MediaType::DockerManifestList)
    }

    /// Whether this is the retired Docker schema 1 manifest, which Kiln can't use.
    pub fn is_schema1(&self) -> bool {
        matches!(
            self,
            MediaType::DockerSchema1Manifest | MediaType::DockerSchema1SignedManifest
        )
    }

    /// Whether this is an image configuration blob.
    pub fn is_config(&self) -> bool {
        matches!(self, MediaType::OciConfig | MediaType::DockerConfig)
    }

    /// Whether this is a filesystem layer (distributable or foreign).
    pub fn is_layer(&self) -> bool {
        self.layer_compression().is_some()
    }

    /// Whether this is a foreign (non-distributable) layer, which registries may refuse and
    /// which is fetched from its descriptor's `urls` instead.
    pub fn is_foreign_layer(&self) -> bool {
        matches!(
            self,
            MediaType::OciForeignLayer
                | MediaType::OciForeignLayerGzip
                | MediaType::OciForeignLayerZstd
                | MediaType::DockerForeignLayerGzip
        )
    }

    /// Whether this media type belongs to the Docker family.
    pub fn is_docker(&self) -> bool {
        self.as_str().starts_with("application/vnd.docker.")
    }

    /// The compression of a layer type, or `None` when this is not a layer type.
    pub fn layer_compression(&self) -> Option<Compression> {
        match self {
            MediaType::OciLayer | MediaType::OciForeignLayer | MediaType::DockerLayer => {
                Some(Compression::None)
            }
            MediaType::OciLayerGzip
            | MediaType::OciForeignLayerGzip
            | MediaType::DockerLayerGzip
            | MediaType::DockerForeignLayerGzip => Some(Compression::Gzip),
            MediaType::OciLayerZstd
            | MediaType::OciForeignLayerZstd
            | MediaType::DockerLayerZstd => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The equivalent media type in `format`, or `None` when that format has no equivalent
    /// (Docker has no uncompressed or zstd foreign layer, nor an empty-config type).
    /// Types that already belong to `format`, and unknown types, map to themselves.
    pub fn in_format(&self, format: ImageFormat) -> Option<MediaType> {
        use MediaType::*;
        let converted = match (format, self) {
            (ImageFormat::Oci, DockerManifest) => OciManifest,
            (ImageFormat::Oci, DockerManifestList) => OciIndex,
            (ImageFormat::Oci, DockerConfig) => OciConfig,
            (ImageFormat::Oci, DockerLayer) => OciLayer,
            (ImageFormat::Oci, DockerLayerGzip) => OciLayerGzip,
            (ImageFormat::Oci, DockerLayerZstd) => OciLayerZstd,
            (ImageFormat::Oci, DockerForeignLayerGzip) => OciForeignLayerGzip,
            (ImageFormat::Oci, DockerSchema1Manifest | DockerSchema1SignedManifest) => return None,
            (ImageFormat::Docker, OciManifest) => DockerManifest,
            (ImageFormat::Docker, OciIndex) => DockerManifestList,
            (ImageFormat::Docker, OciConfig) => DockerConfig,
            (ImageFormat::Docker, OciLayer) => DockerLayer,
            (ImageFormat::Docker, OciLayerGzip) => DockerLayerGzip,
            (ImageFormat::Docker, OciLayerZstd) => DockerLayerZstd,
            (ImageFormat::Docker, OciForeignLayerGzip) => DockerForeignLayerGzip,
            (ImageFormat::Docker, OciForeignLayer | OciForeignLayerZstd | OciEmpty) => return None,
            (_, same) => same.clone(),
        };
        Some(converted)
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MediaType {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(MediaType::parse(s))
    }
}

impl From<&str> for MediaType {
    fn from(s: &str) -> Self {
        MediaType::parse(s)
    }
}

impl serde::Serialize for MediaType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for MediaType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(MediaType::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_type_round_trips_through_its_string() {
        for (t, name) in KNOWN {
            assert_eq!(t.as_str(), *name);
            assert_eq!(&MediaType::parse(name), t);
        }
        let vendor = "application/vnd.example.thing+json";
        assert_eq!(
            MediaType::parse(vendor),
            MediaType::Other(vendor.to_owned())
        );
        assert_eq!(MediaType::parse(vendor).as_str(), vendor);
    }

    #[test]
    fn content_type_parameters_are_ignored() {
        assert_eq!(
            MediaType::parse("application/vnd.oci.image.index.v1+json; charset=utf-8"),
            MediaType::OciIndex
        );
    }

    #[test]
    fn classification() {
        assert!(MediaType::DockerManifest.is_manifest());
        assert!(MediaType::OciManifest.is_manifest());
        assert!(!MediaType::OciIndex.is_manifest());
        assert!(MediaType::DockerManifestList.is_index());
        assert!(MediaType::OciIndex.is_index());
        assert!(MediaType::DockerConfig.is_config());
        assert!(MediaType::DockerSchema1SignedManifest.is_schema1());
        assert!(!MediaType::OciConfig.is_layer());
        assert!(MediaType::DockerForeignLayerGzip.is_foreign_layer());
        assert!(MediaType::OciForeignLayerGzip.is_layer());
        assert!(MediaType::DockerLayerGzip.is_docker());
        assert!(!MediaType::OciLayerGzip.is_docker());
        assert_eq!(
            MediaType::OciLayerZstd.layer_compression(),
            Some(Compression::Zstd)
        );
        assert_eq!(
            MediaType::DockerLayerGzip.layer_compression(),
            Some(Compression::Gzip)
        );
        assert_eq!(
            MediaType::OciLayer.layer_compression(),
            Some(Compression::None)
        );
        assert_eq!(MediaType::OciManifest.layer_compression(), None);
    }

    #[test]
    fn conversion_between_formats() {
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let oci = ImageFormat::Oci.layer_type(compression);
            let docker = ImageFormat::Docker.layer_type(compression);
            assert_eq!(oci.in_format(ImageFormat::Docker), Some(docker.clone()));
            assert_eq!(docker.in_format(ImageFormat::Oci), Some(oci.clone()));
            assert_eq!(oci.in_format(ImageFormat::Oci), Some(oci));
        }
        assert_eq!(
            MediaType::OciForeignLayerGzip.in_format(ImageFormat::Docker),
            Some(MediaType::DockerForeignLayerGzip)
        );
        assert_eq!(
            MediaType::OciForeignLayer.in_format(ImageFormat::Docker),
            None
        );
        assert_eq!(
            ImageFormat::Docker
                .manifest_type()
                .in_format(ImageFormat::Oci),
            Some(ImageFormat::Oci.manifest_type())
        );
        assert_eq!(
            ImageFormat::Oci.index_type().in_format(ImageFormat::Docker),
            Some(MediaType::DockerManifestList)
        );
        let other = MediaType::parse("application/x-custom");
        assert_eq!(other.in_format(ImageFormat::Docker), Some(other.clone()));
    }

    #[test]
    fn serde_uses_the_string() {
        let json = serde_json::to_string(&MediaType::OciLayerGzip).unwrap();
        assert_eq!(json, "\"application/vnd.oci.image.layer.v1.tar+gzip\"");
        let back: MediaType = serde_json::from_str(&json).unwrap();
        assert_eq!(back, MediaType::OciLayerGzip);
    }
}

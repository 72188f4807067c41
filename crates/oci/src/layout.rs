//! The OCI image layout on disk (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`): Kiln's
//! `--oci-layout-path` output and a local image source.
//!
//! Blobs are written through a temporary file in the blob directory, verified, then renamed
//! into place, so a reader never sees a partial or wrong blob under a digest name, even if the
//! writer crashes. `index.json` is replaced the same way. Updates of `index.json` by two
//! processes at once are not serialised; give concurrent builds separate layouts.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::canonical;
use crate::digest::{Algorithm, Digest, DigestWriter, VerifyError, VerifyingReader};
use crate::image::{
    AnyManifest, Descriptor, ImageConfig, ImageError, Index, JsonBlob, Manifest,
    ANNOTATION_REF_NAME,
};
use crate::media_type::ImageFormat;
use crate::platform::Platform;

/// The layout version Kiln writes in `oci-layout`.
pub const LAYOUT_VERSION: &str = "1.0.0";
/// Largest manifest or index Kiln reads, as distribution limits them (4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config Kiln reads; configs with long histories exceed the manifest limit.
pub const MAX_CONFIG_SIZE: u64 = 64 << 20;
/// How deep nested indexes are followed before giving up.
const MAX_INDEX_DEPTH: usize = 4;

/// Why an OCI layout operation failed. Every variant names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The directory lacks a valid `oci-layout` file.
    #[error("{path}: not an OCI image layout: {reason}")]
    NotALayout {
        /// The `oci-layout` file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A JSON document in the layout is invalid.
    #[error("{path}: {source}")]
    Document {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: ImageError,
    },
    /// A blob's content does not match its digest or declared size.
    #[error("{path}: {source}")]
    Verify {
        /// The blob file (or the temporary file being written).
        path: PathBuf,
        /// The mismatch.
        source: VerifyError,
    },
    /// A blob the index or a manifest refers to is missing.
    #[error("{path}: blob {digest} is missing")]
    BlobNotFound {
        /// Where the blob should be.
        path: PathBuf,
        /// Its digest.
        digest: Digest,
    },
    /// A manifest or config is larger than Kiln accepts for a JSON document.
    #[error("{path}: {size} bytes is too large for a JSON document (limit {limit})")]
    TooLarge {
        /// The blob file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// No manifest in `index.json` carries the tag.
    #[error("{layout}: no image tagged {tag:?} in index.json")]
    TagNotFound {
        /// The layout directory.
        layout: PathBuf,
        /// The tag looked for.
        tag: String,
    },
    /// No tag was given and `index.json` does not hold exactly one image.
    #[error("{layout}: index.json lists {count} images; name one with a tag")]
    Ambiguous {
        /// The layout directory.
        layout: PathBuf,
        /// How many entries it has.
        count: usize,
    },
    /// An index has no manifest for the wanted platform.
    #[error("{layout}: index {digest} has no manifest for platform {platform}")]
    NoMatchingPlatform {
        /// The layout directory.
        layout: PathBuf,
        /// The index searched.
        digest: Digest,
        /// The platform wanted.
        platform: String,
    },
    /// Indexes nested deeper than Kiln follows (or a cycle).
    #[error("{layout}: indexes nested more than {MAX_INDEX_DEPTH} deep at {digest}")]
    TooDeep {
        /// The layout directory.
        layout: PathBuf,
        /// The index where Kiln stopped.
        digest: Digest,
    },
    /// A tag name that can't be stored (empty).
    #[error("invalid OCI layout tag {0:?}")]
    InvalidTag(String),
}

#[derive(Serialize, Deserialize)]
struct LayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: String,
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_owned(),
        source,
    }
}

impl OciLayout {
    /// Opens the layout at `dir`, creating the directory, `oci-layout`, `index.json` and
    /// `blobs/sha256` where missing. An existing layout is kept as it is.
    pub fn create(dir: impl AsRef<Path>) -> Result<OciLayout, LayoutError> {
        let root = dir.as_ref().to_owned();
        let blobs = root.join("blobs").join(Algorithm::Sha256.name());
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let layout = OciLayout { root };
        let marker = layout.root.join("oci-layout");
        if marker.exists() {
            layout.check_marker()?;
        } else {
            let bytes = canonical::to_vec(&LayoutFile {
                image_layout_version: LAYOUT_VERSION.to_owned(),
            })
            .map_err(|e| io_err(&marker)(e.into()))?;
            write_atomically(&marker, &bytes)?;
        }
        if !layout.index_path().exists() {
            layout.write_index(&Index::new(ImageFormat::Oci))?;
        }
        Ok(layout)
    }

    /// Opens an existing layout, checking its `oci-layout` file.
    pub fn open(dir: impl AsRef<Path>) -> Result<OciLayout, LayoutError> {
        let layout = OciLayout {
            root: dir.as_ref().to_owned(),
        };
        layout.check_marker()?;
        Ok(layout)
    }

    fn check_marker(&self) -> Result<(), LayoutError> {
        let path = self.root.join("oci-layout");
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LayoutError::NotALayout {
                path: path.clone(),
                reason: "no oci-layout file".to_owned(),
            },
            _ => io_err(&path)(e),
        })?;
        let marker: LayoutFile =
            serde_json::from_slice(&bytes).map_err(|e| LayoutError::NotALayout {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if !marker.image_layout_version.starts_with("1.") {
            return Err(LayoutError::NotALayout {
                path,
                reason: format!(
                    "unsupported imageLayoutVersion {:?}",
                    marker.image_layout_version
                ),
            });
        }
        Ok(())
    }

    /// The layout directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// Whether the blob is present (by name; content is verified when read).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob for streaming. The returned reader verifies the content against
    /// `digest` (and `size`, when given) and fails at the end of a corrupted blob.
    pub fn open_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<VerifyingReader<File>, LayoutError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LayoutError::BlobNotFound {
                path: path.clone(),
                digest: digest.clone(),
            },
            _ => io_err(&path)(e),
        })?;
        Ok(VerifyingReader::new(file, digest, size))
    }

    /// Reads a small blob (manifest, config) whole, verified, refusing more than `limit` bytes.
    pub fn read_blob_bytes(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, LayoutError> {
        let path = self.blob_path(digest);
        let reader = self.open_blob(digest, None)?;
        let mut bytes = Vec::new();
        // Within the limit, `take` reads to end of stream, where the verifier checks the digest.
        reader
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| verify_or_io(&path, e))?;
        if bytes.len() as u64 > limit {
            let size = fs::metadata(&path).map_or(limit + 1, |m| m.len());
            return Err(LayoutError::TooLarge { path, size, limit });
        }
        Ok(bytes)
    }

    /// Starts writing a blob. Bytes go to a temporary file in the blob directory; the blob
    /// appears under its digest name only when [`BlobWriter::commit`] verified it. With
    /// `expected`, its algorithm is used and the content must match it.
    pub fn blob_writer(&self, expected: Option<&Digest>) -> Result<BlobWriter, LayoutError> {
        let algorithm = expected.map_or(Algorithm::Sha256, Digest::algorithm);
        let dir = self.root.join("blobs").join(algorithm.name());
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let temp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?;
        Ok(BlobWriter {
            layout: self.clone(),
            expected: expected.cloned(),
            writer: DigestWriter::new(BufWriter::with_capacity(256 << 10, temp), algorithm),
        })
    }

    /// Streams `reader` into a blob and returns its digest and size; with `expected`, the
    /// content must have that digest.
    pub fn write_blob(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), LayoutError> {
        let mut writer = self.blob_writer(expected)?;
        io::copy(&mut reader, &mut writer).map_err(|e| io_err(&writer.temp_path())(e))?;
        writer.commit()
    }

    /// Stores a serialised document (config, manifest, index) and returns its descriptor.
    pub fn write_json_blob(&self, blob: &JsonBlob) -> Result<Descriptor, LayoutError> {
        let path = self.blob_path(&blob.digest);
        if !path.is_file() {
            write_atomically(&path, &blob.bytes)?;
        }
        Ok(blob.descriptor())
    }

    /// The layout's `index.json`.
    pub fn index(&self) -> Result<Index, LayoutError> {
        let path = self.index_path();
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        Index::from_json(&bytes).map_err(|source| LayoutError::Document { path, source })
    }

    /// Replaces `index.json` atomically.
    pub fn write_index(&self, index: &Index) -> Result<(), LayoutError> {
        let path = self.index_path();
        let blob = index.to_blob().map_err(|source| LayoutError::Document {
            path: path.clone(),
            source,
        })?;
        write_atomically(&path, &blob.bytes)
    }

    /// Lists `manifest` (a manifest or index whose blobs are already in the layout) in
    /// `index.json` under `tag`, replacing whatever had that tag.
    pub fn tag(&self, tag: &str, mut manifest: Descriptor) -> Result<(), LayoutError> {
        if tag.is_empty() {
            return Err(LayoutError::InvalidTag(tag.to_owned()));
        }
        let mut index = self.index()?;
        index
            .manifests
            .retain(|d| d.annotation(ANNOTATION_REF_NAME) != Some(tag));
        manifest
            .annotations
            .insert(ANNOTATION_REF_NAME.to_owned(), tag.to_owned());
        index.manifests.push(manifest);
        self.write_index(&index)
    }

    /// The `index.json` entry tagged `tag`, or with `None` the only entry.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        let index = self.index()?;
        match tag {
            Some(tag) => index
                .manifests
                .into_iter()
                .find(|d| d.annotation(ANNOTATION_REF_NAME) == Some(tag))
                .ok_or_else(|| LayoutError::TagNotFound {
                    layout: self.root.clone(),
                    tag: tag.to_owned(),
                }),
            None => {
                let count = index.manifests.len();
                let mut entries = index.manifests.into_iter();
                match (entries.next(), count) {
                    (Some(only), 1) => Ok(only),
                    _ => Err(LayoutError::Ambiguous {
                        layout: self.root.clone(),
                        count,
                    }),
                }
            }
        }
    }

    /// Reads the manifest or index a descriptor points to.
    pub fn read_any_manifest(&self, descriptor: &Descriptor) -> Result<AnyManifest, LayoutError> {
        let bytes = self.read_blob_bytes(&descriptor.digest, MAX_MANIFEST_SIZE)?;
        AnyManifest::parse(Some(descriptor.media_type.as_str()), &bytes).map_err(|source| {
            LayoutError::Document {
                path: self.blob_path(&descriptor.digest),
                source,
            }
        })
    }

    /// The image manifest tagged `tag` (or the only one), following indexes to the manifest
    /// for `platform`. Returns the manifest's descriptor with it.
    pub fn read_manifest(
        &self,
        tag: Option<&str>,
        platform: &Platform,
    ) -> Result<(Descriptor, Manifest), LayoutError> {
        let mut descriptor = self.resolve(tag)?;
        for _ in 0..=MAX_INDEX_DEPTH {
            match self.read_any_manifest(&descriptor)? {
                AnyManifest::Manifest(manifest) => return Ok((descriptor, manifest)),
                AnyManifest::Index(index) => {
                    descriptor = index.select(platform).cloned().ok_or_else(|| {
                        LayoutError::NoMatchingPlatform {
                            layout: self.root.clone(),
                            digest: descriptor.digest.clone(),
                            platform: platform.to_string(),
                        }
                    })?;
                }
            }
        }
        Err(LayoutError::TooDeep {
            layout: self.root.clone(),
            digest: descriptor.digest,
        })
    }

    /// The image config a manifest refers to.
    pub fn read_config(&self, manifest: &Manifest) -> Result<ImageConfig, LayoutError> {
        let digest = &manifest.config.digest;
        let bytes = self.read_blob_bytes(digest, MAX_CONFIG_SIZE)?;
        ImageConfig::from_json(&bytes).map_err(|source| LayoutError::Document {
            path: self.blob_path(digest),
            source,
        })
    }
}

/// A blob being written into an [`OciLayout`]; see [`OciLayout::blob_writer`]. Dropping it
/// without [`commit`](BlobWriter::commit) removes the temporary file.
pub struct BlobWriter {
    layout: OciLayout,
    expected: Option<Digest>,
    writer: DigestWriter<BufWriter<tempfile::NamedTempFile>>,
}

impl BlobWriter {
    fn temp_path(&self) -> PathBuf {
        self.writer_ref().path().to_owned()
    }

    fn writer_ref(&self) -> &tempfile::NamedTempFile {
        self.writer.get_ref().get_ref()
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.writer.len()
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.writer.is_empty()
    }

    /// Flushes, verifies against the expected digest, and moves the blob into place. Returns
    /// the blob's digest and size.
    pub fn commit(self) -> Result<(Digest, u64), LayoutError> {
        let temp_path = self.temp_path();
        let (buffered, digest, size) = self.writer.finish();
        let temp = buffered
            .into_inner()
            .map_err(|e| io_err(&temp_path)(e.into_error()))?;
        if let Some(expected) = self.expected {
            if expected != digest {
                return Err(LayoutError::Verify {
                    path: temp_path,
                    source: VerifyError::Mismatch {
                        expected,
                        actual: digest,
                    },
                });
            }
        }
        temp.as_file().sync_all().map_err(io_err(&temp_path))?;
        let path = self.layout.blob_path(&digest);
        temp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

fn verify_or_io(path: &Path, err: io::Error) -> LayoutError {
    match VerifyError::from_io(&err) {
        Some(cause) => LayoutError::Verify {
            path: path.to_owned(),
            source: cause.clone(),
        },
        None => io_err(path)(err),
    }
}

/// Writes `bytes` to `path` through a temporary sibling and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    temp.write_all(bytes).map_err(io_err(temp.path()))?;
    temp.as_file().sync_all().map_err(io_err(path))?;
    temp.persist(path).map_err(|e| io_err(path)(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{History, ManifestBuilder};
    use crate::media_type::{Compression, MediaType};

    fn build_image(layout: &OciLayout, layer: &[u8]) -> Descriptor {
        let (digest, size) = layout.write_blob(layer, None).unwrap();
        let mut config = ImageConfig::new(&Platform::parse("linux/amd64").unwrap());
        config.push_layer(digest.clone(), History::default());
        let config = layout
            .write_json_blob(&config.to_blob(ImageFormat::Oci).unwrap())
            .unwrap();
        let manifest = ManifestBuilder::new(ImageFormat::Oci)
            .config_descriptor(config)
            .layer(Descriptor::new(
                ImageFormat::Oci.layer_type(Compression::None),
                digest,
                size,
            ))
            .build()
            .unwrap();
        layout
            .write_json_blob(&manifest.to_blob().unwrap())
            .unwrap()
    }

    #[test]
    fn write_tag_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path().join("img")).unwrap();
        let first = build_image(&layout, b"layer one");
        let second = build_image(&layout, b"layer two");
        layout.tag("v1", first.clone()).unwrap();
        layout.tag("v2", second.clone()).unwrap();
        layout.tag("v1", second.clone()).unwrap(); // retag replaces
        let index = layout.index().unwrap();
        assert_eq!(index.manifests.len(), 2);

        let reopened = OciLayout::open(layout.path()).unwrap();
        let host = Platform::parse("linux/amd64").unwrap();
        let (desc, manifest) = reopened.read_manifest(Some("v1"), &host).unwrap();
        assert_eq!(desc.digest, second.digest);
        let config = reopened.read_config(&manifest).unwrap();
        assert_eq!(config.rootfs.diff_ids[0], Digest::sha256_of(b"layer two"));
        let mut layer = Vec::new();
        reopened
            .open_blob(&manifest.layers[0].digest, Some(manifest.layers[0].size))
            .unwrap()
            .read_to_end(&mut layer)
            .unwrap();
        assert_eq!(layer, b"layer two");

        assert!(matches!(
            reopened.read_manifest(Some("nope"), &host),
            Err(LayoutError::TagNotFound { .. })
        ));
        assert!(matches!(
            reopened.resolve(None),
            Err(LayoutError::Ambiguous { count: 2, .. })
        ));
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(layout.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn blob_writer_rejects_wrong_content_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let expected = Digest::sha256_of(b"right");
        let err = layout
            .write_blob(&b"wrong"[..], Some(&expected))
            .unwrap_err();
        assert!(matches!(err, LayoutError::Verify { .. }), "{err}");
        assert!(!layout.has_blob(&expected));
        assert!(!layout.has_blob(&Digest::sha256_of(b"wrong")));
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );

        let (digest, size) = layout.write_blob(&b"right"[..], Some(&expected)).unwrap();
        assert_eq!((digest, size), (expected.clone(), 5));
        // A blob corrupted on disk is caught when read.
        fs::write(layout.blob_path(&expected), b"rotten").unwrap();
        let err = layout.read_blob_bytes(&expected, 100).unwrap_err();
        assert!(matches!(err, LayoutError::Verify { .. }), "{err}");
        let mut sink = Vec::new();
        let err = layout
            .open_blob(&expected, None)
            .unwrap()
            .read_to_end(&mut sink)
            .unwrap_err();
        assert!(VerifyError::from_io(&err).is_some());
    }

    #[test]
    fn sha512_blobs_go_to_their_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let mut hasher = crate::digest::Hasher::new(Algorithm::Sha512);
        hasher.update(b"x");
        let expected = hasher.finish();
        layout.write_blob(&b"x"[..], Some(&expected)).unwrap();
        assert!(dir
            .path()
            .join("blobs/sha512")
            .join(expected.hex())
            .is_file());
    }

    #[test]
    fn follows_index_to_platform_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let amd = build_image(&layout, b"amd");
        let arm = build_image(&layout, b"arm");
        let mut index = Index::new(ImageFormat::Oci);
        let mut entry = amd.clone();
        entry.platform = Some(Platform::new("linux", "amd64"));
        index.push(entry).unwrap();
        let mut entry = arm.clone();
        entry.platform = Some(Platform::new("linux", "arm64"));
        index.push(entry).unwrap();
        let index_desc = layout.write_json_blob(&index.to_blob().unwrap()).unwrap();
        assert_eq!(index_desc.media_type, MediaType::OciIndex);
        layout.tag("multi", index_desc).unwrap();
        let (chosen, _) = layout
            .read_manifest(Some("multi"), &Platform::parse("linux/aarch64").unwrap())
            .unwrap();
        assert_eq!(chosen.digest, arm.digest);
        let err = layout
            .read_manifest(Some("multi"), &Platform::parse("linux/s390x").unwrap())
            .unwrap_err();
        assert!(
            matches!(err, LayoutError::NoMatchingPlatform { .. }),
            "{err}"
        );
    }

    #[test]
    fn open_rejects_non_layouts() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            OciLayout::open(dir.path()),
            Err(LayoutError::NotALayout { .. })
        ));
        fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"2.0.0"}"#,
        )
        .unwrap();
        let err = OciLayout::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("2.0.0"), "{err}");
    }
}

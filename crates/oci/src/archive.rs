//! docker-archive output (`--tar-path`): the `docker save` tarball that `docker load` and
//! `podman load` read, written as one stream to any `Write`.
//!
//! The archive holds `manifest.json` (one `{Config, RepoTags, Layers}` entry per image), each
//! config as `<hex>.json`, and each layer once: an uncompressed layer as `<hex>/layer.tar`,
//! exactly as classic `docker save` lays it out, a compressed one as `<hex>.tar.gz` or
//! `<hex>.tar.zst` (both loaders decompress layer files they find compressed, so a build need
//! not decompress its layers again to export them). `manifest.json` is written last, after
//! every file it names. Tar headers carry no times or owners, so equal inputs give equal bytes.
//!
//! Layers are streamed from caller-supplied readers and verified against their digest and
//! size on the way through; a layer is never held in memory. If any call fails, the output
//! is incomplete and must be discarded.

use std::collections::HashSet;
use std::io::{self, Read, Write};

use serde::Serialize;

use crate::canonical;
use crate::digest::{Digest, VerifyingReader};
use crate::image::{Descriptor, ImageConfig, ImageError, JsonBlob};
use crate::media_type::Compression;
use crate::reference::Reference;

/// Why a docker-archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Writing to the output failed.
    #[error("writing docker archive: {0}")]
    Io(#[from] io::Error),
    /// A layer's reader failed, or its content did not match its digest or size.
    #[error("docker archive: layer {digest}: {source}")]
    Layer {
        /// The layer.
        digest: Digest,
        /// The cause (wraps a [`crate::digest::VerifyError`] on mismatch).
        source: io::Error,
    },
    /// The config blob is not a valid image config.
    #[error("docker archive: {0}")]
    Config(#[from] ImageError),
    /// The config's diff ID count differs from the number of layers given.
    #[error(
        "docker archive: image config {config} lists {diff_ids} layers but {layers} were given"
    )]
    LayerCount {
        /// The config blob.
        config: Digest,
        /// Number of diff IDs in the config.
        diff_ids: usize,
        /// Number of layers passed.
        layers: usize,
    },
    /// An uncompressed layer is not the diff ID the config lists at its position.
    #[error("docker archive: uncompressed layer {digest} at position {position} is not the config's diff ID {diff_id}")]
    DiffIdMismatch {
        /// The layer given.
        digest: Digest,
        /// Its position, bottom first.
        position: usize,
        /// The diff ID in the config.
        diff_id: Digest,
    },
    /// A reference without a tag can't be a `RepoTags` entry.
    #[error("docker archive: {0} has no tag; RepoTags entries need one")]
    Untagged(String),
}

/// A layer to put in the archive: the blob's digest and size as stored (compressed or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveLayer {
    /// Digest of the bytes the reader will produce.
    pub digest: Digest,
    /// Their exact count.
    pub size: u64,
    /// How they are compressed; for `None`, `digest` is the layer's diff ID.
    pub compression: Compression,
}

impl ArchiveLayer {
    /// The archive layer for a manifest's layer descriptor, or `None` if it is not a layer.
    pub fn from_descriptor(descriptor: &Descriptor) -> Option<ArchiveLayer> {
        Some(ArchiveLayer {
            compression: descriptor.media_type.layer_compression()?,
            digest: descriptor.digest.clone(),
            size: descriptor.size,
        })
    }

    fn file_name(&self) -> String {
        match self.compression {
            Compression::None => format!("{}/layer.tar", self.digest.hex()),
            other => format!("{}.{}", self.digest.hex(), other.tar_extension()),
        }
    }
}

#[derive(Serialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Writes a docker-archive stream; see the module documentation.
pub struct DockerArchiveWriter<W: Write> {
    tar: tar::Builder<W>,
    entries: Vec<ManifestEntry>,
    written: HashSet<String>,
}

impl<W: Write> DockerArchiveWriter<W> {
    /// Starts an archive on `out`. Wrap files in a `BufWriter`; entries are written in
    /// 512-byte tar blocks.
    pub fn new(out: W) -> DockerArchiveWriter<W> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Deterministic);
        DockerArchiveWriter {
            tar,
            entries: Vec::new(),
            written: HashSet::new(),
        }
    }

    /// Adds an image: its config blob, the names it is loaded under (`RepoTags`, written in
    /// the familiar form `busybox:latest`), and its layers bottom first. `open_layer` is
    /// called once per layer not already in the archive and must return a reader producing
    /// exactly that blob.
    pub fn add_image<R, F>(
        &mut self,
        config: &JsonBlob,
        tags: &[Reference],
        layers: &[ArchiveLayer],
        mut open_layer: F,
    ) -> Result<(), ArchiveError>
    where
        R: Read,
        F: FnMut(&ArchiveLayer) -> io::Result<R>,
    {
        let parsed = ImageConfig::from_json(&config.bytes)?;
        let diff_ids = &parsed.rootfs.diff_ids;
        if diff_ids.len() != layers.len() {
            return Err(ArchiveError::LayerCount {
                config: config.digest.clone(),
                diff_ids: diff_ids.len(),
                layers: layers.len(),
            });
        }
        for (position, (layer, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
            if layer.compression == Compression::None && &layer.digest != diff_id {
                return Err(ArchiveError::DiffIdMismatch {
                    digest: layer.digest.clone(),
                    position,
                    diff_id: diff_id.clone(),
                });
            }
        }
        let repo_tags = tags
            .iter()
            .map(|tag| match tag.tag() {
                Some(_) => Ok(without_digest(tag).familiar()),
                None => Err(ArchiveError::Untagged(tag.to_string())),
            })
            .collect::<Result<Vec<_>, _>>()?;

        let config_name = format!("{}.json", config.digest.hex());
        if self.written.insert(config_name.clone()) {
            self.append_file(&config_name, config.bytes.len() as u64, &config.bytes[..])?;
        }
        let mut layer_names = Vec::with_capacity(layers.len());
        for layer in layers {
            let name = layer.file_name();
            if !self.written.contains(&name) {
                if let Some((dir, _)) = name.split_once('/') {
                    self.append_dir(dir)?;
                }
                let layer_err = |source| ArchiveError::Layer {
                    digest: layer.digest.clone(),
                    source,
                };
                let reader = open_layer(layer).map_err(layer_err)?;
                let verified = VerifyingReader::new(reader, &layer.digest, Some(layer.size));
                self.append_file(&name, layer.size, verified)
                    .map_err(|e| match e {
                        ArchiveError::Io(source) => layer_err(source),
                        other => other,
                    })?;
                self.written.insert(name.clone());
            }
            layer_names.push(name);
        }
        self.entries.push(ManifestEntry {
            config: config_name,
            repo_tags,
            layers: layer_names,
        });
        Ok(())
    }

    /// Writes `manifest.json` and the end of the tar, and returns the output.
    pub fn finish(mut self) -> Result<W, ArchiveError> {
        let manifest = canonical::to_vec(&self.entries).map_err(io::Error::from)?;
        self.append_file("manifest.json", manifest.len() as u64, &manifest[..])?;
        let mut out = self.tar.into_inner()?;
        out.flush()?;
        Ok(out)
    }

    fn append_file(&mut self, name: &str, size: u64, data: impl Read) -> Result<(), ArchiveError> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        self.tar.append_data(&mut header, name, data)?;
        Ok(())
    }

    fn append_dir(&mut self, name: &str) -> Result<(), ArchiveError> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        header.set_mode(0o755);
        header.set_mtime(0);
        self.tar
            .append_data(&mut header, format!("{name}/"), io::empty())?;
        Ok(())
    }
}

/// `RepoTags` name an image by tag; a digest would make the name unparsable for loaders.
fn without_digest(reference: &Reference) -> Reference {
    match reference.tag() {
        Some(tag) => reference
            .with_tag(tag)
            .unwrap_or_else(|_| reference.clone()),
        None => reference.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::digest::VerifyError;
    use crate::image::History;
    use crate::media_type::ImageFormat;
    use crate::platform::Platform;

    fn config_for(diff_ids: &[Digest]) -> JsonBlob {
        let mut config = ImageConfig::new(&Platform::parse("linux/amd64").unwrap());
        for diff_id in diff_ids {
            config.push_layer(diff_id.clone(), History::default());
        }
        config.to_blob(ImageFormat::Docker).unwrap()
    }

    fn entries(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut tar = tar::Archive::new(archive);
        tar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn writes_manifest_config_and_deduplicated_layers() {
        let layer_a = b"tar bytes of layer a".to_vec();
        let layer_b = b"gzip bytes of layer b".to_vec();
        let a = ArchiveLayer {
            digest: Digest::sha256_of(&layer_a),
            size: layer_a.len() as u64,
            compression: Compression::None,
        };
        let b = ArchiveLayer {
            digest: Digest::sha256_of(&layer_b),
            size: layer_b.len() as u64,
            compression: Compression::Gzip,
        };
        let config = config_for(&[a.digest.clone(), Digest::sha256_of(b"diff of b")]);
        let mut opened = Vec::new();
        let mut writer = DockerArchiveWriter::new(Vec::new());
        let tags = [
            Reference::parse("busybox").unwrap(),
            Reference::parse("127.0.0.1:5000/app:1").unwrap(),
        ];
        for _ in 0..2 {
            writer
                .add_image(&config, &tags, &[a.clone(), b.clone()], |layer| {
                    opened.push(layer.digest.clone());
                    Ok(if layer == &a {
                        &layer_a[..]
                    } else {
                        &layer_b[..]
                    })
                })
                .unwrap();
        }
        let archive = writer.finish().unwrap();
        assert_eq!(opened.len(), 2, "each layer is streamed once");
        let files = entries(&archive);
        let a_name = format!("{}/layer.tar", a.digest.hex());
        let b_name = format!("{}.tar.gz", b.digest.hex());
        assert_eq!(files[&a_name], layer_a);
        assert_eq!(files[&b_name], layer_b);
        assert_eq!(
            files[&format!("{}.json", config.digest.hex())],
            config.bytes
        );
        let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let entry = &manifest[0];
        assert_eq!(
            entry["RepoTags"],
            serde_json::json!(["busybox:latest", "127.0.0.1:5000/app:1"])
        );
        assert_eq!(entry["Layers"], serde_json::json!([a_name, b_name]));
        assert_eq!(manifest.as_array().unwrap().len(), 2);

        // Deterministic: the same input gives the same bytes.
        let mut again = DockerArchiveWriter::new(Vec::new());
        for _ in 0..2 {
            again
                .add_image(&config, &tags, &[a.clone(), b.clone()], |layer| {
                    Ok(if layer == &a {
                        &layer_a[..]
                    } else {
                        &layer_b[..]
                    })
                })
                .unwrap();
        }
        assert_eq!(again.finish().unwrap(), archive);
    }

    #[test]
    fn rejects_inconsistent_input() {
        let data = b"layer".to_vec();
        let layer = ArchiveLayer {
            digest: Digest::sha256_of(&data),
            size: data.len() as u64,
            compression: Compression::None,
        };
        let tags = [Reference::parse("app:1").unwrap()];
        let open = |_: &ArchiveLayer| Ok(&data[..]);

        let mut w = DockerArchiveWriter::new(Vec::new());
        let err = w.add_image(&config_for(&[]), &tags, std::slice::from_ref(&layer), open);
        assert!(matches!(err, Err(ArchiveError::LayerCount { .. })));

        let other = config_for(&[Digest::sha256_of(b"other")]);
        let err = w.add_image(&other, &tags, std::slice::from_ref(&layer), open);
        assert!(matches!(
            err,
            Err(ArchiveError::DiffIdMismatch { position: 0, .. })
        ));

        let digest_only = Reference::parse(&format!("app@{}", layer.digest)).unwrap();
        let config = config_for(std::slice::from_ref(&layer.digest));
        let err = w.add_image(&config, &[digest_only], std::slice::from_ref(&layer), open);
        assert!(matches!(err, Err(ArchiveError::Untagged(_))));

        let wrong = b"LAYER".to_vec();
        let err = w
            .add_image(&config, &tags, std::slice::from_ref(&layer), |_| {
                Ok(&wrong[..])
            })
            .unwrap_err();
        match err {
            ArchiveError::Layer { digest, source } => {
                assert_eq!(digest, layer.digest);
                assert!(matches!(
                    VerifyError::from_io(&source),
                    Some(VerifyError::Mismatch { .. })
                ));
            }
            other => panic!("{other}"),
        }
        let mut w = DockerArchiveWriter::new(Vec::new());
        let err = w
            .add_image(&config, &tags, std::slice::from_ref(&layer), |_| {
                Ok(&data[..3])
            })
            .unwrap_err();
        assert!(
            err.to_string().contains("ended after 3 of 5 bytes"),
            "{err}"
        );
    }
}

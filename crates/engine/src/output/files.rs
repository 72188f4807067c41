//! Local outputs: an OCI layout, a docker-archive, and the digest files kaniko writes.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_fs::blobstore::BlobStore;
use kiln_oci::archive::{ArchiveLayer, DockerArchiveWriter};
use kiln_oci::layout::OciLayout;
use kiln_oci::{Digest, Reference};

use crate::error::BuildError;
use crate::options::OutputOptions;

use super::assemble::Image;

/// Writes an OCI image layout at `path` (created if missing, tagged `tag`).
pub fn write_oci_layout(
    path: &Path,
    blobs: &BlobStore,
    image: &Image,
    tag: &str,
) -> Result<(), BuildError> {
    let layout_error =
        |e: kiln_oci::layout::LayoutError| BuildError::image(path.display().to_string(), e);
    let layout = if path.join("oci-layout").is_file() {
        OciLayout::open(path).map_err(layout_error)?
    } else {
        OciLayout::create(path).map_err(layout_error)?
    };
    for layer in &image.layers {
        if layout.has_blob(&layer.descriptor.digest) {
            continue;
        }
        let blob_path = blobs.blob_path(&layer.descriptor.digest);
        let file = std::fs::File::open(&blob_path).map_err(|source| BuildError::Io {
            path: blob_path,
            source,
        })?;
        layout
            .write_blob(file, Some(&layer.descriptor.digest))
            .map_err(layout_error)?;
    }
    layout
        .write_json_blob(&image.config)
        .map_err(layout_error)?;
    let descriptor = layout
        .write_json_blob(&image.manifest)
        .map_err(layout_error)?;
    layout.tag(tag, descriptor).map_err(layout_error)
}

/// Writes a docker-archive (`docker load` / `podman load`) at `path`, named by `tags`.
pub fn write_docker_archive(
    path: &Path,
    blobs: &BlobStore,
    image: &Image,
    tags: &[Reference],
) -> Result<(), BuildError> {
    let temp = temp_sibling(path);
    let result = (|| {
        let file = std::fs::File::create(&temp).map_err(|source| BuildError::Io {
            path: temp.clone(),
            source,
        })?;
        let mut writer = DockerArchiveWriter::new(std::io::BufWriter::new(file));
        let layers: Vec<ArchiveLayer> = image
            .layers
            .iter()
            .map(|l| {
                ArchiveLayer::from_descriptor(&l.descriptor).ok_or_else(|| {
                    BuildError::image(
                        format!("layer {}", l.descriptor.digest),
                        "it has no docker-archive form",
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        writer
            .add_image(&image.config, tags, &layers, |layer| {
                std::fs::File::open(blobs.blob_path(&layer.digest))
            })
            .map_err(|e| BuildError::image(path.display().to_string(), e))?;
        let mut out = writer
            .finish()
            .map_err(|e| BuildError::image(path.display().to_string(), e))?;
        out.flush().map_err(|source| BuildError::Io {
            path: temp.clone(),
            source,
        })?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&temp, path).map_err(|source| BuildError::Io {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Writes `content` to `path` atomically (temporary sibling, then rename).
pub fn write_file_atomically(path: &Path, content: &str) -> Result<(), BuildError> {
    let temp = temp_sibling(path);
    std::fs::write(&temp, content).map_err(|source| BuildError::Io {
        path: temp.clone(),
        source,
    })?;
    std::fs::rename(&temp, path).map_err(|source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn temp_sibling(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".kiln-tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// The digest files kaniko writes after a successful push.
pub fn write_digest_files(
    output: &OutputOptions,
    destinations: &[Reference],
    digest: &Digest,
) -> Result<(), BuildError> {
    if let Some(path) = &output.digest_file {
        write_file_atomically(path, &digest.to_string())?;
    }
    if let Some(path) = &output.image_name_with_digest_file {
        let lines: Vec<String> = destinations
            .iter()
            .map(|d| format!("{}@{digest}", d.name()))
            .collect();
        write_file_atomically(path, &format!("{}\n", lines.join("\n")))?;
    }
    if let Some(path) = &output.image_name_tag_with_digest_file {
        let lines: Vec<String> = destinations
            .iter()
            .map(|d| format!("{}:{}@{digest}", d.name(), d.tag().unwrap_or("latest")))
            .collect();
        write_file_atomically(path, &format!("{}\n", lines.join("\n")))?;
    }
    Ok(())
}

/// The tag an OCI layout entry gets: the first destination's tag, else `latest`.
pub fn layout_tag(destinations: &[Reference]) -> String {
    destinations
        .first()
        .and_then(|d| d.tag())
        .unwrap_or("latest")
        .to_owned()
}

//! Applying an image layer to a root filesystem, as a container runtime would.
//!
//! [`unpack_layer`] reads a layer blob from any [`Read`] (a registry response, a file in a blob
//! store), recognises gzip, zstd or plain tar from its first bytes, and applies the entries to a
//! [`Root`] in the same pass, with bounded memory:
//!
//! - whiteouts (`.wh.NAME`) delete `NAME` from lower layers; an opaque whiteout
//!   (`.wh..wh..opq`) hides everything lower layers put in its directory while keeping what this
//!   layer puts there, in whichever order the entries come (OCI image spec, "Whiteouts");
//! - directories merge with an existing directory; any other type replaces what was there (a
//!   directory replaced by a file is removed with its contents, and the reverse);
//! - hard links (relative or absolute names) link to a file of this or a lower layer, both ends
//!   resolved inside the root; symlinks are created verbatim and never followed when writing;
//! - character and block devices and FIFOs are created when the process may (`CAP_MKNOD`),
//!   otherwise skipped, named in [`UnpackReport::skipped`] and in a `tracing` warning;
//! - numeric owners (`lchown`), permission bits including setuid/setgid/sticky (set after the
//!   owner, which clears them), every `SCHILY.xattr.*` PAX record including
//!   `security.capability` (set after the owner, which clears it), and modification times
//!   (directories last, once their contents are written).
//!
//! Every path goes through [`Root`]: an entry whose parent is a symlink lands where that
//! symlink points *inside* the root. An entry or hard-link name that is empty, contains NUL or
//! climbs above the root with `..` fails the unpack with [`UnpackError::InvalidEntry`], naming
//! the layer digest and the entry.
//!
//! The blob's digest is computed over the compressed bytes as they stream by; the stream is read
//! to its end and compared before `unpack_layer` returns (also when it fails to decode, so a
//! corrupted blob is reported as a digest mismatch; an entry refused in a well-formed stream
//! stops the read at once). **Any error means the root is partially written and must be
//! discarded** — a digest mismatch in particular is only known once every entry has been
//! applied. [`UnpackEvent`]s delivered before an error describe that discarded root.

mod apply;
mod image;
mod name;
mod pool;
mod stream;

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use kiln_oci::{Algorithm, Digest};

use crate::resolve::{Root, RootError};
pub use image::unpack_layer_image;
pub use stream::Compression;

/// What happened to one path while a layer was applied, for callers that keep an index of the
/// rootfs (the snapshotter) and want to fill it during unpack instead of walking afterwards.
#[derive(Debug)]
pub enum UnpackEvent<'a> {
    /// `path` was written by this layer and has this (final for the layer) metadata.
    /// Non-directories are reported once complete (a regular file written by a worker thread
    /// when the worker is done, always before a later entry of the layer touches it, so the
    /// events of one path keep the layer's order); directories after the
    /// layer's last entry, once their modification times are set. When the entry's parent is a
    /// symlink, `path` is the entry's name as written in the layer, not the symlink's target.
    Written {
        /// Path relative to the root, without a leading `/`; empty for the root itself.
        path: &'a Path,
        /// `lstat` of the path after writing.
        metadata: &'a std::fs::Metadata,
    },
    /// `path` and everything under it were removed (by a whiteout, an opaque directory, or
    /// because this layer replaced it with an entry of another type).
    Removed {
        /// Path relative to the root, without a leading `/`.
        path: &'a Path,
    },
}

/// Options for [`unpack_layer`].
#[derive(Default)]
pub struct UnpackOptions<'a> {
    /// The layer's diffID (digest of the uncompressed tar) from the image config; when set, it
    /// is verified as well as the blob digest.
    pub diff_id: Option<&'a Digest>,
    /// Called for every path written or removed, see [`UnpackEvent`].
    pub on_event: Option<&'a mut dyn FnMut(UnpackEvent<'_>)>,
}

/// An entry that was not applied, and why (e.g. a device node without `CAP_MKNOD`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    /// The entry's path relative to the root.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

/// What [`unpack_layer`] did.
#[derive(Debug, Clone)]
pub struct UnpackReport {
    /// The verified blob digest.
    pub digest: Digest,
    /// The diffID: sha256 of the uncompressed tar stream.
    pub diff_id: Digest,
    /// How the blob was compressed.
    pub compression: Compression,
    /// Size of the blob.
    pub compressed_size: u64,
    /// Size of the uncompressed tar stream.
    pub uncompressed_size: u64,
    /// Number of tar entries applied (whiteouts included, skipped entries not).
    pub entries: u64,
    /// Entries that were not applied; also logged as `tracing` warnings.
    pub skipped: Vec<SkippedEntry>,
}

/// Why a layer could not be applied. After any of these the root is partially written and must
/// be discarded (see [`UnpackError::rootfs_unusable`]).
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry is malformed or hostile: invalid name, `..` escaping the root, a hard link to a
    /// directory or out of the root, a bad header field.
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    InvalidEntry {
        /// The layer's blob digest.
        layer: Digest,
        /// The entry name as found in the tar (lossy UTF-8).
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// Applying an entry failed on the filesystem.
    #[error("layer {layer}: entry {entry:?}: {source}")]
    Apply {
        /// The layer's blob digest.
        layer: Digest,
        /// The entry name as found in the tar (lossy UTF-8).
        entry: String,
        /// The failed operation.
        #[source]
        source: Box<RootError>,
    },
    /// The stream could not be read or decoded: truncated, corrupt compression, bad tar header.
    #[error("layer {layer}: reading the layer stream after {offset} compressed bytes: {source}")]
    Stream {
        /// The layer's blob digest.
        layer: Digest,
        /// How many compressed bytes had been read.
        offset: u64,
        /// The read or decode error.
        #[source]
        source: io::Error,
    },
    /// The blob uses a compression Kiln does not read.
    #[error(
        "layer {layer}: unsupported compression {name} (gzip, zstd and plain tar are supported)"
    )]
    UnsupportedCompression {
        /// The layer's blob digest.
        layer: Digest,
        /// The compression recognised from the magic bytes.
        name: &'static str,
    },
    /// The blob's bytes do not hash to its digest.
    #[error("layer {expected}: digest mismatch: the {size} bytes received hash to {actual}; the rootfs it was unpacked into must be discarded")]
    DigestMismatch {
        /// The digest the layer was asked for.
        expected: Digest,
        /// What the received bytes hash to.
        actual: Digest,
        /// How many bytes were received.
        size: u64,
    },
    /// The uncompressed tar does not hash to the expected diffID.
    #[error("layer {layer}: diffID mismatch: expected {expected}, the uncompressed tar hashes to {actual}; the rootfs it was unpacked into must be discarded")]
    DiffIdMismatch {
        /// The layer's blob digest.
        layer: Digest,
        /// The diffID from the image config.
        expected: Digest,
        /// What the uncompressed tar hashes to.
        actual: Digest,
    },
}

impl UnpackError {
    /// Always true: an unpack that failed has changed the root in unknown ways, and the root
    /// must not be used (snapshotted, run, pushed). Provided so callers state that in code.
    pub fn rootfs_unusable(&self) -> bool {
        true
    }
}

/// Applies the layer blob read from `layer`, whose digest must be `digest`, to `root`.
///
/// On success the blob was read to its end, every entry is applied and both digests matched; on
/// error the root must be discarded (see the module documentation).
pub fn unpack_layer<R: Read>(
    root: &Root,
    layer: R,
    digest: &Digest,
    options: UnpackOptions<'_>,
) -> Result<UnpackReport, UnpackError> {
    unpack_layer_except(root, layer, digest, options, None)
}

/// [`unpack_layer`] that leaves alone every path for which `skip` (given the entry's path
/// relative to the root, without a leading `/`) is true: its entry, a whiteout of it and an
/// opaque marker on it are not applied. In-place builds use it to keep the container's mount
/// points and Kiln's own directory, which a base layer must not overwrite. An opaque marker or a
/// whiteout on a directory that merely *contains* such a path is still applied.
pub fn unpack_layer_except<'a, R: Read>(
    root: &Root,
    layer: R,
    digest: &Digest,
    options: UnpackOptions<'a>,
    skip: Option<&'a dyn Fn(&Path) -> bool>,
) -> Result<UnpackReport, UnpackError> {
    let applier = apply::Applier::new(root, digest, options.on_event, skip);
    unpack_with(applier, layer, digest, options.diff_id)
}

/// Unpacks one layer on its own into the empty `root`, as an overlayfs lower dir: a whiteout
/// becomes a 0:0 character device and an opaque marker the `trusted.overlay.opaque` xattr on its
/// directory, so that overlayfs, stacking such trees, shows what applying the layers one on top
/// of the other would. Needs root (`mknod`, `trusted.*` xattrs).
///
/// A layer that only makes sense on top of the layers below it fails with
/// [`UnpackError::InvalidEntry`] (and the root must be discarded): an entry or whiteout in a
/// directory the layer does not list (unpacked alone, it would be made up with mode 0755 and
/// hide the lower layers' directory, or their symlink in its place), a hard link to a lower
/// layer's file, an overlayfs xattr, or a 0:0 character device (which overlayfs reads as a
/// whiteout). Such a layer must be applied onto a rootfs instead.
pub fn unpack_layer_tree<R: Read>(
    root: &Root,
    layer: R,
    digest: &Digest,
    diff_id: Option<&Digest>,
) -> Result<UnpackReport, UnpackError> {
    let mut applier = apply::Applier::new(root, digest, None, None);
    applier.overlay = true;
    unpack_with(applier, layer, digest, diff_id)
}

fn unpack_with<R: Read>(
    mut applier: apply::Applier<'_, '_>,
    layer: R,
    digest: &Digest,
    expected_diff_id: Option<&Digest>,
) -> Result<UnpackReport, UnpackError> {
    let mut compressed = stream::HashingReader::new(layer, digest.algorithm());

    let applied = match apply_entries(&mut compressed, &mut applier, digest) {
        // A refused entry in a stream that decodes fine: no need to read the rest to say so.
        Err(e) if !matches!(e, UnpackError::Stream { .. }) => return Err(e),
        other => other,
    };

    // A stream that failed to decode, or a complete one: the received bytes decide first, so a
    // corrupted or substituted blob is reported as such, not as whichever entry it broke.
    let offset = compressed.len();
    let (actual, size) = match compressed.drain_and_finish() {
        Ok(done) => done,
        Err(source) => {
            return Err(match applied {
                Err(e) => e,
                Ok(_) => UnpackError::Stream {
                    layer: digest.clone(),
                    offset,
                    source,
                },
            })
        }
    };
    if &actual != digest {
        return Err(UnpackError::DigestMismatch {
            expected: digest.clone(),
            actual,
            size,
        });
    }
    let (compression, diff_id, uncompressed_size) = applied?;
    if let Some(expected) = expected_diff_id {
        if expected != &diff_id {
            return Err(UnpackError::DiffIdMismatch {
                layer: digest.clone(),
                expected: expected.clone(),
                actual: diff_id,
            });
        }
    }
    let (entries, skipped) = applier.finish()?;
    Ok(UnpackReport {
        digest: actual,
        diff_id,
        compression,
        compressed_size: size,
        uncompressed_size,
        entries,
        skipped,
    })
}

/// Recognises the blob's compression from its first bytes, read from `compressed`, and returns
/// it with the decompressed stream of the whole blob (those bytes included).
pub(super) fn decompressed<'a, R: Read + 'a>(
    compressed: &'a mut stream::HashingReader<R>,
    digest: &Digest,
) -> Result<(Compression, Box<dyn Read + 'a>), UnpackError> {
    let stream_err = |offset: u64, source: io::Error| UnpackError::Stream {
        layer: digest.clone(),
        offset,
        source,
    };
    let mut magic = [0u8; stream::MAGIC_LEN];
    let n = stream::read_up_to(compressed, &mut magic).map_err(|e| stream_err(0, e))?;
    let compression = match stream::detect(&magic[..n]) {
        stream::Detected::Supported(c) => c,
        stream::Detected::Unsupported(name) => {
            return Err(UnpackError::UnsupportedCompression {
                layer: digest.clone(),
                name,
            })
        }
    };
    let whole = io::Cursor::new(magic[..n].to_vec()).chain(compressed);
    let decoder = stream::decompressor(compression, whole).map_err(|e| stream_err(n as u64, e))?;
    Ok((compression, decoder))
}

/// Decompresses and applies every tar entry; returns the compression, the diffID and the tar
/// size. The compressed stream is left wherever the tar ended.
fn apply_entries<R: Read>(
    compressed: &mut stream::HashingReader<R>,
    applier: &mut apply::Applier<'_, '_>,
    digest: &Digest,
) -> Result<(Compression, Digest, u64), UnpackError> {
    // The decompressor holds `compressed` only by reference, so the blob can be drained and
    // digested after the tar ends.
    let offset_of = |c: &stream::HashingReader<R>| c.len();
    let (compression, result) = {
        let (compression, decoder) = decompressed(&mut *compressed, digest)?;
        let mut tar_stream = stream::HashingReader::new(decoder, Algorithm::Sha256);
        let outcome = {
            let mut archive = tar::Archive::new(&mut tar_stream);
            applier.apply_archive(&mut archive)
        };
        let result = match outcome {
            Ok(()) => tar_stream
                .drain_and_finish()
                .map_err(apply::Failure::Stream),
            Err(e) => Err(e),
        };
        (compression, result)
    };
    match result {
        Ok((diff_id, tar_size)) => Ok((compression, diff_id, tar_size)),
        Err(apply::Failure::Stream(source)) => Err(UnpackError::Stream {
            layer: digest.clone(),
            offset: offset_of(compressed),
            source,
        }),
        Err(apply::Failure::Entry(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests;

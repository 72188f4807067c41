//! The byte side of unpacking: digesting the compressed stream as it is read, recognising the
//! compression from its first bytes, and digesting the uncompressed tar (the diffID).

use std::io::{self, Read};

use kiln_oci::{Algorithm, Digest, Hasher};

/// How a layer blob is compressed, as recognised from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// Zstandard (one or more frames).
    Zstd,
}

/// Longest magic number looked at (xz's is six bytes).
pub(crate) const MAGIC_LEN: usize = 6;

/// What the first bytes of a blob say about its compression.
pub(crate) enum Detected {
    /// A format Kiln decompresses.
    Supported(Compression),
    /// A compression Kiln does not read (bzip2, xz); the name is for the error message.
    Unsupported(&'static str),
}

/// Recognises the compression from the blob's first bytes; anything else is taken as a plain
/// tar, whose parser then decides.
pub(crate) fn detect(magic: &[u8]) -> Detected {
    if magic.starts_with(&[0x1f, 0x8b]) {
        Detected::Supported(Compression::Gzip)
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Detected::Supported(Compression::Zstd)
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Detected::Unsupported("xz")
    } else if magic.starts_with(b"BZh") {
        Detected::Unsupported("bzip2")
    } else {
        Detected::Supported(Compression::None)
    }
}

/// Reads as many bytes as fit in `buf` unless the stream ends first; returns how many.
pub(crate) fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A reader that digests and counts everything read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R, algorithm: Algorithm) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(algorithm),
        }
    }

    /// Bytes read so far.
    pub(crate) fn len(&self) -> u64 {
        self.hasher.len()
    }

    /// Reads the rest of the stream (into the digest only) and returns the digest and size of
    /// everything that passed through.
    pub(crate) fn drain_and_finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.finish())
    }

    /// The digest and size of what has been read, without reading further.
    pub(crate) fn finish(self) -> (Digest, u64) {
        let len = self.hasher.len();
        (self.hasher.finish(), len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Wraps `reader` (which must yield the whole blob, magic bytes included) in the decompressor
/// for `compression`.
pub(crate) fn decompressor<'a>(
    compression: Compression,
    reader: impl Read + 'a,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn detects_formats() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"x").unwrap();
        let gz = gz.finish().unwrap();
        assert!(matches!(
            detect(&gz),
            Detected::Supported(Compression::Gzip)
        ));
        let zst = zstd::encode_all(&b"x"[..], 3).unwrap();
        assert!(matches!(
            detect(&zst),
            Detected::Supported(Compression::Zstd)
        ));
        assert!(matches!(detect(b"BZh91AY"), Detected::Unsupported("bzip2")));
        assert!(matches!(
            detect(b"usr/"),
            Detected::Supported(Compression::None)
        ));
        assert!(matches!(
            detect(b""),
            Detected::Supported(Compression::None)
        ));
    }

    #[test]
    fn hashing_reader_digests_the_rest_when_drained() {
        let data = b"0123456789".repeat(1000);
        let mut r = HashingReader::new(&data[..], Algorithm::Sha256);
        let mut head = [0u8; 4];
        read_up_to(&mut r, &mut head).unwrap();
        assert_eq!(r.len(), 4);
        let (digest, len) = r.drain_and_finish().unwrap();
        assert_eq!(len, data.len() as u64);
        assert_eq!(digest, Digest::sha256_of(&data));
    }
}

//! Content digests (`sha256:<hex>`, `sha512:<hex>`) as the OCI image spec defines them, and
//! streaming hashers so a blob is digested in the same pass that reads or writes it.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// A hash algorithm allowed in an OCI digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, the algorithm every registry and runtime must support.
    Sha256,
    /// SHA-512, optional in the spec but accepted by distribution.
    Sha512,
}

impl Algorithm {
    /// The name as it appears before the colon in a digest string.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex-encoded hash, used to reject truncated or padded digests early.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a string is not a valid digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The string has no `algorithm:` prefix.
    #[error("invalid digest {0:?}: expected ALGORITHM:HEX")]
    Format(String),
    /// The algorithm is not one Kiln can verify.
    #[error("invalid digest {0:?}: unsupported algorithm (sha256 and sha512 are supported)")]
    UnsupportedAlgorithm(String),
    /// The encoded part has the wrong length or characters other than lowercase hex.
    #[error("invalid digest {0:?}: the hash must be {1} lowercase hex characters")]
    Encoding(String, usize),
}

/// A validated content digest. Ordering and equality are by algorithm then hex, so digests can
/// key maps deterministically.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 hex>` or `sha512:<128 hex>`, rejecting uppercase hex as the spec does.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Format(s.to_owned()))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(DigestError::UnsupportedAlgorithm(s.to_owned())),
        };
        let lower_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if hex.len() != algorithm.hex_len() || !hex.chars().all(lower_hex) {
            return Err(DigestError::Encoding(s.to_owned(), algorithm.hex_len()));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// Builds a digest from raw hash bytes produced by `algorithm`.
    pub fn from_bytes(algorithm: Algorithm, hash: &[u8]) -> Self {
        Digest {
            algorithm,
            hex: hex::encode(hash),
        }
    }

    /// The SHA-256 digest of a byte slice; for small documents such as manifests and configs.
    pub fn sha256_of(data: &[u8]) -> Self {
        Self::from_bytes(Algorithm::Sha256, &Sha256::digest(data))
    }

    /// The algorithm part.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part, as used in blob store and OCI layout file names.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A hasher of the same algorithm, to verify a stream against this digest.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An incremental hasher that also counts bytes, so a stream's digest and size come from one pass.
#[derive(Clone)]
pub struct Hasher {
    state: HasherState,
    len: u64,
}

#[derive(Clone)]
enum HasherState {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        let state = match algorithm {
            Algorithm::Sha256 => HasherState::Sha256(Sha256::new()),
            Algorithm::Sha512 => HasherState::Sha512(Sha512::new()),
        };
        Hasher { state, len: 0 }
    }

    /// A fresh SHA-256 hasher, the default for everything Kiln produces.
    pub fn sha256() -> Self {
        Self::new(Algorithm::Sha256)
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        match &mut self.state {
            HasherState::Sha256(h) => h.update(data),
            HasherState::Sha512(h) => h.update(data),
        }
    }

    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self.state {
            HasherState::Sha256(h) => Digest::from_bytes(Algorithm::Sha256, &h.finalize()),
            HasherState::Sha512(h) => Digest::from_bytes(Algorithm::Sha512, &h.finalize()),
        }
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer adaptor that digests and counts everything passed through to the inner writer, so
/// writing a blob to disk or the network yields its digest without a second read.
pub struct DigestWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> DigestWriter<W> {
    /// Wraps `inner`, hashing with `algorithm`.
    pub fn new(inner: W, algorithm: Algorithm) -> Self {
        DigestWriter {
            inner,
            hasher: Hasher::new(algorithm),
        }
    }

    /// The inner writer, e.g. to learn a temporary file's path.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    /// Returns the inner writer, the digest and the size of what was written.
    pub fn finish(self) -> (W, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Why a stream did not match the digest (and size) it was expected to have. Carried inside
/// the `io::Error` a [`VerifyingReader`] returns (kind `InvalidData` or `UnexpectedEof`), so
/// callers can add the blob's path or registry and still match on the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The content hashed to another digest.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Mismatch {
        /// The digest the content should have.
        expected: Digest,
        /// The digest it has.
        actual: Digest,
    },
    /// The stream ended before the declared size.
    #[error("blob {expected} ended after {actual} of {expected_size} bytes")]
    TooShort {
        /// The digest the content should have.
        expected: Digest,
        /// The declared size.
        expected_size: u64,
        /// The bytes received.
        actual: u64,
    },
    /// The stream has more bytes than declared.
    #[error("blob {expected} is longer than its declared {expected_size} bytes")]
    TooLong {
        /// The digest the content should have.
        expected: Digest,
        /// The declared size.
        expected_size: u64,
    },
}

impl VerifyError {
    /// The `VerifyError` inside an I/O error returned by a [`VerifyingReader`], if any.
    pub fn from_io(err: &io::Error) -> Option<&VerifyError> {
        err.get_ref()?.downcast_ref::<VerifyError>()
    }
}

/// A reader adaptor that checks the stream against an expected digest (and optionally size)
/// as it passes through. It reports end of stream only after the check passed, so whoever
/// consumes it to the end never silently accepts a wrong blob; a wrong stream yields an
/// `io::Error` wrapping a [`VerifyError`]. With a size, it never reads past that size plus
/// one probe byte, so a lying source can't make it consume unbounded data.
pub struct VerifyingReader<R> {
    inner: R,
    expected: Digest,
    expected_size: Option<u64>,
    hasher: Hasher,
    verified: bool,
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`, which must produce exactly the content of `expected` (of
    /// `expected_size` bytes, when given).
    pub fn new(inner: R, expected: &Digest, expected_size: Option<u64>) -> Self {
        VerifyingReader {
            inner,
            hasher: expected.hasher(),
            expected: expected.clone(),
            expected_size,
            verified: false,
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.hasher.len()
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn finish_check(&mut self) -> io::Result<()> {
        if let Some(expected_size) = self.expected_size {
            if self.hasher.len() < expected_size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    VerifyError::TooShort {
                        expected: self.expected.clone(),
                        expected_size,
                        actual: self.hasher.len(),
                    },
                ));
            }
            let mut probe = [0u8; 1];
            let extra = loop {
                match self.inner.read(&mut probe) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if extra > 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    VerifyError::TooLong {
                        expected: self.expected.clone(),
                        expected_size,
                    },
                ));
            }
        }
        let actual = self.hasher.clone().finish();
        if actual != self.expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                VerifyError::Mismatch {
                    expected: self.expected.clone(),
                    actual,
                },
            ));
        }
        self.verified = true;
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.verified || buf.is_empty() {
            return Ok(0);
        }
        let want = match self.expected_size {
            Some(size) => {
                let remaining = size - self.hasher.len();
                if remaining == 0 {
                    self.finish_check()?;
                    return Ok(0);
                }
                buf.len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX))
            }
            None => buf.len(),
        };
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.finish_check()?;
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_round_trip() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        assert_eq!(Digest::sha256_of(b""), d);
    }

    #[test]
    fn rejects_malformed_digests() {
        assert!(matches!(Digest::parse("abc"), Err(DigestError::Format(_))));
        assert!(matches!(
            Digest::parse("md5:d41d8cd98f00b204e9800998ecf8427e"),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
        let upper = EMPTY_SHA256.to_uppercase().replace("SHA256", "sha256");
        assert!(matches!(
            Digest::parse(&upper),
            Err(DigestError::Encoding(_, 64))
        ));
        assert!(Digest::parse(&EMPTY_SHA256[..70]).is_err());
    }

    #[test]
    fn writer_digests_what_passes_through() {
        let mut w = DigestWriter::new(Vec::new(), Algorithm::Sha512);
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (bytes, digest, len) = w.finish();
        assert_eq!(bytes, b"hello world");
        assert_eq!(len, 11);
        let mut h = Hasher::new(Algorithm::Sha512);
        h.update(b"hello world");
        assert_eq!(h.finish(), digest);
        assert_eq!(digest.hex().len(), 128);
    }

    #[test]
    fn verifying_reader_accepts_exact_content_only() {
        let data = b"some blob content".to_vec();
        let digest = Digest::sha256_of(&data);
        let read_all = |bytes: &[u8], size: Option<u64>| {
            let mut out = Vec::new();
            VerifyingReader::new(bytes, &digest, size)
                .read_to_end(&mut out)
                .map(|_| out)
        };
        assert_eq!(read_all(&data, Some(data.len() as u64)).unwrap(), data);
        assert_eq!(read_all(&data, None).unwrap(), data);

        let cause = |r: io::Result<Vec<u8>>| VerifyError::from_io(&r.unwrap_err()).cloned();
        let mut tampered = data.clone();
        tampered[0] ^= 1;
        assert!(matches!(
            cause(read_all(&tampered, None)),
            Some(VerifyError::Mismatch { .. })
        ));
        assert!(matches!(
            cause(read_all(&data[..5], Some(data.len() as u64))),
            Some(VerifyError::TooShort { actual: 5, .. })
        ));
        let mut longer = data.clone();
        longer.extend_from_slice(b"more");
        assert!(matches!(
            cause(read_all(&longer, Some(data.len() as u64))),
            Some(VerifyError::TooLong { .. })
        ));
    }
}

//! Layer compression with digests computed in the same pass.
//!
//! [`Compressor`] is a `Write` sink for an uncompressed layer tar. It hashes what it is given
//! (the diffID), compresses it and hashes the compressed bytes (the blob digest) on their way to
//! the inner writer.
//!
//! Gzip is compressed in parallel the way pigz does it: the input is cut into independent
//! 128 KiB blocks, each deflated on a worker thread with the 32 KiB before it as preset
//! dictionary and ended with a sync flush (which byte-aligns it), and the pieces are joined in
//! order into one standard gzip member whose CRC-32 is combined from the blocks' CRCs. Block
//! boundaries depend only on the input, so the output is byte-identical whatever the number of
//! threads. Memory is bounded by a fixed number of blocks in flight.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use flate2::{Compress, FlushCompress};
use kiln_oci::{Algorithm, Digest, DigestWriter, Hasher};

/// Bytes of input per independently compressed gzip block.
pub const GZIP_BLOCK_SIZE: usize = 128 * 1024;
/// Bytes of the previous block used as the deflate dictionary of the next.
const DICTIONARY_SIZE: usize = 32 * 1024;

/// A compression algorithm and level for layer blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Uncompressed tar; the blob digest equals the diffID.
    None,
    /// gzip at `level` 0–9 (Docker and kaniko default to 6 via Go's default level).
    Gzip {
        /// Deflate level, 0 (store) to 9 (smallest).
        level: u32,
    },
    /// zstd at `level` 1–22.
    Zstd {
        /// zstd level; 3 is zstd's default.
        level: i32,
    },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Gzip { level: 6 }
    }
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn oci_layer_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip { .. } => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd { .. } => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Digests and sizes of one compressed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// SHA-256 of the uncompressed bytes (a layer's diffID).
    pub diff_id: Digest,
    /// Number of uncompressed bytes.
    pub uncompressed_size: u64,
    /// SHA-256 of the compressed bytes (the blob digest).
    pub digest: Digest,
    /// Number of compressed bytes.
    pub size: u64,
}

/// A `Write` sink that compresses into `W` and digests both sides.
pub struct Compressor<W: Write + Send + 'static> {
    inner: Inner<W>,
}

struct ZstdStream<W: Write> {
    tar: Hasher,
    encoder: zstd::stream::write::Encoder<'static, DigestWriter<W>>,
}

enum Inner<W: Write + Send + 'static> {
    Plain(Box<DigestWriter<W>>),
    Zstd(Box<ZstdStream<W>>),
    Gzip(Box<ParallelGzip<W>>),
}

impl<W: Write + Send + 'static> Compressor<W> {
    /// Starts a stream into `sink`. `threads` is the number of compression workers for gzip
    /// (at least one is used); other algorithms run on the calling thread.
    pub fn new(sink: W, compression: Compression, threads: usize) -> io::Result<Self> {
        let inner = match compression {
            Compression::None => Inner::Plain(Box::new(DigestWriter::new(sink, Algorithm::Sha256))),
            Compression::Zstd { level } => {
                let mut encoder = zstd::stream::write::Encoder::new(
                    DigestWriter::new(sink, Algorithm::Sha256),
                    level,
                )?;
                // Fixed frame parameters keep the output independent of the zstd version's
                // heuristics for unknown sizes as far as the library allows.
                encoder.include_checksum(false)?;
                encoder.include_contentsize(false)?;
                Inner::Zstd(Box::new(ZstdStream {
                    tar: Hasher::sha256(),
                    encoder,
                }))
            }
            Compression::Gzip { level } => Inner::Gzip(Box::new(ParallelGzip::new(
                sink,
                level.min(9),
                threads.max(1),
            )?)),
        };
        Ok(Compressor { inner })
    }

    /// Ends the stream and returns the inner writer with the digests and sizes.
    pub fn finish(self) -> io::Result<(W, StreamSummary)> {
        match self.inner {
            Inner::Plain(writer) => {
                let (sink, digest, size) = (*writer).finish();
                Ok((
                    sink,
                    StreamSummary {
                        diff_id: digest.clone(),
                        uncompressed_size: size,
                        digest,
                        size,
                    },
                ))
            }
            Inner::Zstd(zstd) => {
                let ZstdStream { tar, encoder } = *zstd;
                let uncompressed_size = tar.len();
                let diff_id = tar.finish();
                let writer = encoder.finish()?;
                let (sink, digest, size) = writer.finish();
                Ok((
                    sink,
                    StreamSummary {
                        diff_id,
                        uncompressed_size,
                        digest,
                        size,
                    },
                ))
            }
            Inner::Gzip(gz) => gz.finish(),
        }
    }
}

impl<W: Write + Send + 'static> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(w) => w.write(buf),
            Inner::Zstd(zstd) => {
                let n = zstd.encoder.write(buf)?;
                zstd.tar.update(&buf[..n]);
                Ok(n)
            }
            Inner::Gzip(gz) => gz.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Flushing mid-stream would change block boundaries and so the bytes; data is flushed at
        // `finish`.
        Ok(())
    }
}

struct Job {
    seq: u64,
    data: Vec<u8>,
    dictionary: Vec<u8>,
}

struct Done {
    seq: u64,
    deflated: io::Result<Vec<u8>>,
    crc: crc32fast::Hasher,
    len: usize,
}

struct WriterResult<W> {
    sink: W,
    digest: Digest,
    size: u64,
}

/// The pigz-style parallel gzip pipeline: the caller's thread cuts blocks, `threads` workers
/// deflate them, one writer thread puts them in order and writes them out.
struct ParallelGzip<W: Write + Send + 'static> {
    block: Vec<u8>,
    dictionary: Vec<u8>,
    seq: u64,
    tar: Hasher,
    jobs: Option<Sender<Job>>,
    /// One token per block allowed in flight; the writer hands tokens back as it writes.
    tokens: Receiver<()>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<WriterResult<W>>>>,
}

impl<W: Write + Send + 'static> ParallelGzip<W> {
    fn new(sink: W, level: u32, threads: usize) -> io::Result<Self> {
        let in_flight = threads * 4 + 2;
        let (job_tx, job_rx) = bounded::<Job>(threads * 2);
        let (done_tx, done_rx) = bounded::<Done>(threads * 2);
        let (token_tx, token_rx) = bounded::<()>(in_flight);
        for _ in 0..in_flight {
            token_tx
                .send(())
                .map_err(|_| io::Error::other("token channel closed"))?;
        }
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("kiln-gzip-{i}"))
                .spawn(move || deflate_worker(level, job_rx, done_tx))?;
            workers.push(handle);
        }
        drop(done_tx);
        let writer = std::thread::Builder::new()
            .name("kiln-gzip-out".into())
            .spawn(move || write_in_order(sink, level, done_rx, token_tx))?;
        Ok(ParallelGzip {
            block: Vec::with_capacity(GZIP_BLOCK_SIZE),
            dictionary: Vec::new(),
            seq: 0,
            tar: Hasher::sha256(),
            jobs: Some(job_tx),
            tokens: token_rx,
            workers,
            writer: Some(writer),
        })
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = GZIP_BLOCK_SIZE - self.block.len();
        let n = room.min(buf.len());
        self.block.extend_from_slice(&buf[..n]);
        self.tar.update(&buf[..n]);
        if self.block.len() == GZIP_BLOCK_SIZE {
            self.dispatch()?;
        }
        Ok(n)
    }

    fn dispatch(&mut self) -> io::Result<()> {
        let data = std::mem::replace(&mut self.block, Vec::with_capacity(GZIP_BLOCK_SIZE));
        let tail = &data[data.len().saturating_sub(DICTIONARY_SIZE)..];
        let next_dictionary = tail.to_vec();
        let dictionary = std::mem::replace(&mut self.dictionary, next_dictionary);
        if self.tokens.recv().is_err() {
            return Err(self.pipeline_failure());
        }
        let job = Job {
            seq: self.seq,
            data,
            dictionary,
        };
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job).is_ok());
        if sent != Some(true) {
            return Err(self.pipeline_failure());
        }
        self.seq += 1;
        Ok(())
    }

    /// The writer or a worker stopped early; its own error is the one worth reporting.
    fn pipeline_failure(&mut self) -> io::Error {
        self.jobs = None;
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("gzip writer thread panicked"),
            _ => io::Error::other("gzip pipeline stopped"),
        }
    }

    fn finish(mut self) -> io::Result<(W, StreamSummary)> {
        if !self.block.is_empty() {
            self.dispatch()?;
        }
        self.jobs = None;
        for worker in self.workers.drain(..) {
            worker
                .join()
                .map_err(|_| io::Error::other("gzip worker thread panicked"))?;
        }
        let writer = self
            .writer
            .take()
            .ok_or_else(|| io::Error::other("gzip pipeline already failed"))?;
        let result = writer
            .join()
            .map_err(|_| io::Error::other("gzip writer thread panicked"))??;
        let tar = std::mem::replace(&mut self.tar, Hasher::sha256());
        Ok((
            result.sink,
            StreamSummary {
                uncompressed_size: tar.len(),
                diff_id: tar.finish(),
                digest: result.digest,
                size: result.size,
            },
        ))
    }
}

impl<W: Write + Send + 'static> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        // On an abandoned stream, close the job queue so the threads wind down.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn deflate_worker(level: u32, jobs: Receiver<Job>, done: Sender<Done>) {
    for job in jobs {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&job.data);
        // A panic in the deflater (a library bug) must fail the layer: otherwise the writer
        // waits forever for this block while the other workers run out of tokens.
        let deflated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            deflate_block(level, &job.data, &job.dictionary)
        }))
        .unwrap_or_else(|_| Err(io::Error::other("deflate: the compressor panicked")));
        if done
            .send(Done {
                seq: job.seq,
                deflated,
                crc,
                len: job.data.len(),
            })
            .is_err()
        {
            return;
        }
    }
}

/// Raw deflate of one block, primed with `dictionary`, ended with a sync flush so the next
/// block's bytes can follow directly. Each block gets a compressor of its own: one reused
/// after `reset` made bytes that depended on the blocks it had deflated before, and so on
/// which worker got the block (layers differed between two `--reproducible` builds).
fn deflate_block(level: u32, data: &[u8], dictionary: &[u8]) -> io::Result<Vec<u8>> {
    let mut deflate = Compress::new(flate2::Compression::new(level), false);
    if !dictionary.is_empty() {
        deflate
            .set_dictionary(dictionary)
            .map_err(|e| io::Error::other(format!("deflate dictionary: {e}")))?;
    }
    let start_in = deflate.total_in();
    let mut out = Vec::with_capacity(data.len() + data.len() / 16 + 64);
    loop {
        let consumed = (deflate.total_in() - start_in) as usize;
        deflate
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .map_err(|e| io::Error::other(format!("deflate: {e}")))?;
        let consumed = (deflate.total_in() - start_in) as usize;
        // zlib's flush is complete once it returns with output space left over.
        if consumed == data.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(out.capacity().max(4096));
    }
}

fn write_in_order<W: Write>(
    sink: W,
    level: u32,
    done: Receiver<Done>,
    tokens: Sender<()>,
) -> io::Result<WriterResult<W>> {
    let mut out = DigestWriter::new(sink, Algorithm::Sha256);
    // gzip header: no name, no mtime, so equal input gives equal bytes; OS "unknown".
    let xfl = match level {
        9 => 2,
        1 => 4,
        _ => 0,
    };
    out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 0xff])?;
    let mut crc = crc32fast::Hasher::new();
    let mut total: u64 = 0;
    let mut next: u64 = 0;
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    for piece in done {
        pending.insert(piece.seq, piece);
        while let Some(piece) = pending.remove(&next) {
            let bytes = piece.deflated?;
            out.write_all(&bytes)?;
            crc.combine(&piece.crc);
            total += piece.len as u64;
            next += 1;
            // The producer may be gone already (finishing); nothing to hand the token to then.
            let _ = tokens.send(());
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other("gzip block missing from the pipeline"));
    }
    // A final empty fixed-Huffman block with BFINAL set ends the deflate stream.
    out.write_all(&[0x03, 0x00])?;
    out.write_all(&crc.finalize().to_le_bytes())?;
    out.write_all(&(total as u32).to_le_bytes())?;
    out.flush()?;
    let (sink, digest, size) = out.finish();
    Ok(WriterResult { sink, digest, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: words from a small vocabulary driven by an LCG.
        let words: [&[u8]; 8] = [
            b"layer ", b"kiln ", b"tar ", b"gzip ", b"0123 ", b"\n", b"rootfs/", b"zz",
        ];
        let mut out = Vec::with_capacity(len);
        let mut x: u32 = 12345;
        while out.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.extend_from_slice(words[(x >> 16) as usize % words.len()]);
            if x.is_multiple_of(7) {
                out.push((x >> 8) as u8);
            }
        }
        out.truncate(len);
        out
    }

    /// `len` pseudo-random bytes from `seed` (xorshift), which deflate cannot shrink.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn compress(data: &[u8], compression: Compression, threads: usize) -> (Vec<u8>, StreamSummary) {
        let mut c = Compressor::new(Vec::new(), compression, threads).unwrap();
        // Odd write sizes exercise block cutting across writes.
        for chunk in data.chunks(7919) {
            c.write_all(chunk).unwrap();
        }
        c.finish().unwrap()
    }

    #[test]
    fn parallel_gzip_is_identical_for_any_thread_count_and_decodes() {
        let data = sample(3 * GZIP_BLOCK_SIZE + 12_345);
        let (one, s1) = compress(&data, Compression::Gzip { level: 6 }, 1);
        let (two, s2) = compress(&data, Compression::Gzip { level: 6 }, 2);
        let (four, _) = compress(&data, Compression::Gzip { level: 6 }, 4);
        assert_eq!(one, two);
        assert_eq!(one, four);
        assert_eq!(s1, s2);
        assert_eq!(s1.diff_id, Digest::sha256_of(&data));
        assert_eq!(s1.digest, Digest::sha256_of(&one));
        assert_eq!(s1.size, one.len() as u64);
        assert!(one.len() < data.len() / 2);
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, data);
    }

    /// Which worker deflates a block, and what it deflated before, depends on scheduling: a
    /// block's bytes must depend on its data and dictionary only, or `--reproducible` layers
    /// differ from run to run. Blocks of text, noise and zeros, each kind deflated differently.
    #[test]
    fn gzip_bytes_do_not_depend_on_which_worker_got_a_block() {
        let mut data = Vec::new();
        for round in 0..6u64 {
            data.extend(sample(GZIP_BLOCK_SIZE + 1000 * round as usize));
            data.extend(noise(0x9e37_79b9_7f4a_7c15 ^ round, GZIP_BLOCK_SIZE / 2));
            data.extend(std::iter::repeat_n(0u8, GZIP_BLOCK_SIZE / 3));
        }
        // Machine code, as in the layer of Kiln's own image where builds first differed.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        data.extend(&exe[..exe.len().min(40 * GZIP_BLOCK_SIZE)]);
        let (expected, _) = compress(&data, Compression::Gzip { level: 6 }, 1);
        for threads in [2, 3, 4, 2, 3, 4] {
            let (got, _) = compress(&data, Compression::Gzip { level: 6 }, threads);
            assert!(got == expected, "{threads} threads gave other bytes");
        }
    }

    #[test]
    fn noise_of_any_length_round_trips() {
        for (seed, len) in [
            (0x1234_5678_9abc_def1_u64, 3 * GZIP_BLOCK_SIZE + 1),
            (0x0bad_cafe_f00d_1234, 5 * GZIP_BLOCK_SIZE + 70_000),
        ] {
            let mut x = seed;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            let (out, _) = compress(&data, Compression::Gzip { level: 6 }, 2);
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(&out[..])
                .read_to_end(&mut decoded)
                .unwrap();
            assert_eq!(decoded, data);
        }
    }

    #[test]
    fn empty_gzip_stream_is_valid() {
        let (bytes, summary) = compress(b"", Compression::Gzip { level: 6 }, 2);
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(decoded.is_empty());
        assert_eq!(summary.uncompressed_size, 0);
    }

    #[test]
    fn zstd_and_plain_round_trip() {
        let data = sample(200_000);
        let (bytes, summary) = compress(&data, Compression::Zstd { level: 3 }, 1);
        assert_eq!(zstd::decode_all(&bytes[..]).unwrap(), data);
        assert_eq!(summary.diff_id, Digest::sha256_of(&data));
        assert_eq!(summary.digest, Digest::sha256_of(&bytes));
        let (plain, summary) = compress(&data, Compression::None, 1);
        assert_eq!(plain, data);
        assert_eq!(summary.digest, summary.diff_id);
    }
}

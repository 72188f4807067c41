//! Blobs stream: pushing and pulling a blob much larger than the memory the process is allowed
//! to grow by must not hold it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::StreamExt as _;
use kiln_oci::Hasher;
use kiln_registry::{
    Client, Keychain, PushBlobOptions, PushOutcome, ReaderSource, RegistryOptions, Repository,
};
use kiln_testkit::Registry;
use tokio::io::{AsyncRead, ReadBuf};

use crate::support::test_options;

/// Pseudo-random bytes (xorshift), `remaining` of them, made on the fly.
struct Generated {
    state: u64,
    remaining: u64,
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.remaining).min(64 * 1024) as usize;
        let mut chunk = vec![0u8; n];
        for b in chunk.iter_mut() {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *b = (self.state >> 32) as u8;
        }
        self.remaining -= n as u64;
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blob_round_trip_stays_within_bounded_memory() {
    const SIZE: u64 = 160 * 1024 * 1024;
    let registry = Registry::start();
    let client = Client::new(RegistryOptions {
        chunk_size: 4 * 1024 * 1024,
        ..test_options(Keychain::anonymous())
    })
    .unwrap();
    let repo = Repository::new(registry.addr(), "big").unwrap();

    let mut expected = Hasher::sha256();
    {
        let mut reference = Generated {
            state: 42,
            remaining: SIZE,
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut reference, &mut buf)
                .await
                .unwrap();
            if n == 0 {
                break;
            }
            expected.update(&buf[..n]);
        }
    }
    let expected = expected.finish();

    // Unknown length and digest: chunked, digest computed on the way.
    let source = ReaderSource::new(
        Generated {
            state: 42,
            remaining: SIZE,
        },
        None,
    );
    let pushed = client
        .push_blob(&repo, &source, &PushBlobOptions::default())
        .await
        .unwrap();
    assert_eq!(pushed.outcome, PushOutcome::Uploaded);
    assert_eq!(pushed.digest, expected);
    assert_eq!(pushed.size, Some(SIZE));

    let mut stream = client.get_blob(&repo, &expected).await.unwrap();
    assert_eq!(stream.size(), Some(SIZE));
    let mut pulled = Hasher::sha256();
    while let Some(chunk) = stream.next().await {
        pulled.update(&chunk.unwrap());
    }
    assert_eq!(pulled.len(), SIZE);
    assert_eq!(pulled.finish(), expected);

    let peak = peak_rss_kib();
    eprintln!(
        "peak RSS after a {} MiB push and pull: {} MiB",
        SIZE >> 20,
        peak / 1024
    );
    assert!(
        peak < 128 * 1024,
        "peak RSS {peak} KiB: a {} MiB blob must not be held in memory",
        SIZE >> 20
    );
}

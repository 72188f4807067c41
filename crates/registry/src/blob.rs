//! Blob content in motion: the verified download stream, and the sources an upload reads from.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _};
use kiln_oci::{Digest, Hasher};
use reqwest::header::RANGE;
use reqwest::StatusCode;
use tokio::io::AsyncRead;
use tokio::sync::OwnedSemaphorePermit;
use url::Url;

use crate::error::{Error, Operation};
use crate::transport::{status_error, Ctx, Endpoint, Inner};

/// A boxed reader, as returned by [`BlobSource::open`].
pub type BoxAsyncRead = Box<dyn AsyncRead + Send + Unpin>;

/// Content to upload. An upload that fails part-way is restarted from the beginning only if
/// the source can be opened again; a one-shot source turns such a failure into an error.
pub trait BlobSource: Send + Sync {
    /// Opens the content from its first byte. `Ok(None)` means it cannot be read again.
    fn open(&self) -> BoxFuture<'_, io::Result<Option<BoxAsyncRead>>>;

    /// The size in bytes, if known before reading; a known size (with a known digest) allows
    /// a single-request upload.
    fn size(&self) -> Option<u64>;
}

/// A file on disk: re-readable, size known.
#[derive(Clone, Debug)]
pub struct FileSource {
    path: PathBuf,
    size: u64,
}

impl FileSource {
    /// Refers to `path`, reading its size now.
    pub async fn new(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let size = tokio::fs::metadata(&path).await?.len();
        Ok(FileSource { path, size })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlobSource for FileSource {
    fn open(&self) -> BoxFuture<'_, io::Result<Option<BoxAsyncRead>>> {
        Box::pin(async move {
            let file = tokio::fs::File::open(&self.path).await?;
            Ok(Some(Box::new(file) as BoxAsyncRead))
        })
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }
}

/// Bytes already in memory (configs, small test blobs): re-readable, size known.
#[derive(Clone, Debug)]
pub struct BytesSource(pub Bytes);

impl BlobSource for BytesSource {
    fn open(&self) -> BoxFuture<'_, io::Result<Option<BoxAsyncRead>>> {
        let reader = io::Cursor::new(self.0.clone());
        Box::pin(async move { Ok(Some(Box::new(reader) as BoxAsyncRead)) })
    }

    fn size(&self) -> Option<u64> {
        Some(self.0.len() as u64)
    }
}

/// A reader that can be consumed once (a pipe from a compressor, a network stream). Chunks
/// that fail are re-sent from the chunk buffer, but a failed single-request upload cannot be
/// restarted.
pub struct ReaderSource {
    reader: Mutex<Option<BoxAsyncRead>>,
    size: Option<u64>,
}

impl ReaderSource {
    /// Wraps `reader`; pass its size if known.
    pub fn new(reader: impl AsyncRead + Send + Unpin + 'static, size: Option<u64>) -> Self {
        ReaderSource {
            reader: Mutex::new(Some(Box::new(reader))),
            size,
        }
    }
}

impl BlobSource for ReaderSource {
    fn open(&self) -> BoxFuture<'_, io::Result<Option<BoxAsyncRead>>> {
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        Box::pin(async move { Ok(reader) })
    }

    fn size(&self) -> Option<u64> {
        self.size
    }
}

/// A blob being downloaded: a stream of chunks whose digest is checked as they pass. The last
/// item is an error if the content does not match the digest; whatever was received must then
/// be discarded. A connection that breaks mid-way is resumed with a `Range` request (or, if the
/// registry ignores ranges, by skipping what was already received), up to the retry limit.
pub struct BlobStream {
    inner: BoxStream<'static, Result<Bytes, Error>>,
    size: Option<u64>,
}

impl BlobStream {
    /// The blob's size as announced by the registry (`Content-Length`), if it sent one.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The stream as an [`AsyncRead`]; a digest mismatch or transfer error becomes an
    /// `io::Error` whose inner error is the [`Error`].
    pub fn into_async_read(self) -> impl AsyncRead + Send + Unpin {
        tokio_util::io::StreamReader::new(self.inner.map(|r| r.map_err(io::Error::other)))
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct PullState {
    inner: Arc<Inner>,
    endpoint: Arc<Endpoint>,
    url: Url,
    scopes: Vec<String>,
    target: String,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    hasher: Option<Hasher>,
    expected: Digest,
    /// Bytes already passed on.
    offset: u64,
    /// Bytes to drop from the start of a restarted response that ignored the `Range`.
    skip: u64,
    resumes: u32,
    finished: bool,
    _permit: OwnedSemaphorePermit,
}

/// Starts a verified download of `url` (already answered with `first`, a 200).
#[allow(clippy::too_many_arguments)]
pub(crate) fn blob_stream(
    inner: Arc<Inner>,
    endpoint: Arc<Endpoint>,
    url: Url,
    scopes: Vec<String>,
    target: String,
    expected: Digest,
    first: reqwest::Response,
    permit: OwnedSemaphorePermit,
) -> BlobStream {
    let size = first.content_length();
    let state = PullState {
        inner,
        endpoint,
        url,
        scopes,
        target,
        body: first.bytes_stream().boxed(),
        hasher: Some(expected.hasher()),
        expected,
        offset: 0,
        skip: 0,
        resumes: 0,
        finished: false,
        _permit: permit,
    };
    let inner = futures::stream::unfold(state, |mut state| async move {
        let item = state.next_item().await?;
        Some((item, state))
    })
    .boxed();
    BlobStream { inner, size }
}

impl PullState {
    async fn next_item(&mut self) -> Option<Result<Bytes, Error>> {
        if self.finished {
            return None;
        }
        loop {
            let stall = self.inner.options.stall_timeout;
            let next = match crate::transport::within(stall, self.body.next()).await {
                Some(next) => next.map(|r| {
                    r.map_err(|e| Error::transport(&self.target, Operation::PullBlob, &e))
                }),
                None => Some(Err(crate::transport::body_stalled(
                    Ctx {
                        target: &self.target,
                        operation: Operation::PullBlob,
                    },
                    &self.url,
                    stall.unwrap_or_default(),
                ))),
            };
            match next {
                Some(Ok(mut chunk)) => {
                    if self.skip > 0 {
                        let dropped = self.skip.min(chunk.len() as u64) as usize;
                        self.skip -= dropped as u64;
                        chunk = chunk.slice(dropped..);
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    self.offset += chunk.len() as u64;
                    return Some(Ok(chunk));
                }
                Some(Err(err)) => {
                    if self.resumes >= self.inner.options.retries {
                        self.finished = true;
                        return Some(Err(err));
                    }
                    let delay = self.inner.backoff(self.resumes);
                    let reason = format!(
                        "the download broke off after {} bytes ({err}); resuming there",
                        self.offset
                    );
                    let ctx = Ctx {
                        target: &self.target,
                        operation: Operation::PullBlob,
                    };
                    self.inner.retry_note(ctx, reason, self.resumes, delay);
                    tokio::time::sleep(delay).await;
                    self.resumes += 1;
                    if let Err(err) = self.resume().await {
                        self.finished = true;
                        return Some(Err(err));
                    }
                }
                None => {
                    self.finished = true;
                    let actual = self.hasher.take()?.finish();
                    if actual != self.expected {
                        return Some(Err(Error::digest_mismatch(
                            &self.target,
                            Operation::PullBlob,
                            &self.expected,
                            actual,
                        )));
                    }
                    return None;
                }
            }
        }
    }

    async fn resume(&mut self) -> Result<(), Error> {
        let ctx = Ctx {
            target: &self.target,
            operation: Operation::PullBlob,
        };
        let range = format!("bytes={}-", self.offset);
        let url = self.url.clone();
        let resp = self
            .inner
            .send(&self.endpoint, ctx, &self.scopes, |http| {
                Some(http.get(url.clone()).header(RANGE, range.clone()))
            })
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let start = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(self.offset) {
                    return Err(Error::invalid(
                        &self.target,
                        Operation::PullBlob,
                        format!(
                            "asked to resume at byte {}, got range {start:?}",
                            self.offset
                        ),
                    ));
                }
                self.skip = 0;
            }
            StatusCode::OK => self.skip = self.offset,
            _ => return Err(status_error(resp, ctx).await),
        }
        self.body = resp.bytes_stream().boxed();
        Ok(())
    }
}

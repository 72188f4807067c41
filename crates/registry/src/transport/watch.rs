//! Bounded waits. A registry that accepts a connection and then goes silent must cost the stall
//! timeout, not forever; a transfer that keeps moving must never be cut, however long it takes.
//! reqwest's read timeout cannot say this: it runs from the start of the request until the
//! answer's headers arrive, so a large upload that kept moving would fail once it took longer
//! than the timeout. Here a request's body goes out in slices, each of which counts as
//! progress, the wait for the answer's headers counts from the last slice sent, and every chunk
//! of an answer's body must arrive within the stall timeout of the one before.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

/// How much of an in-memory body goes out as one slice: small enough that a slow link still
/// shows progress well within any stall timeout.
const SLICE: usize = 64 * 1024;

/// When bytes last moved for one try of one request.
#[derive(Debug)]
pub(crate) struct Progress {
    start: Instant,
    /// Nanoseconds after `start` of the last movement.
    last: AtomicU64,
}

impl Progress {
    pub(crate) fn new() -> Arc<Progress> {
        Arc::new(Progress {
            start: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// Runs `work` until it finishes or nothing has moved for `stall` (as told by `progress`);
/// `None` means it stalled. With no stall timeout it waits as long as `work` does.
pub(crate) async fn unless_stalled<T>(
    progress: &Progress,
    stall: Option<Duration>,
    work: impl Future<Output = T>,
) -> Option<T> {
    let Some(stall) = stall else {
        return Some(work.await);
    };
    let mut work = std::pin::pin!(work);
    loop {
        let give_up_at = progress.last() + stall;
        tokio::select! {
            done = &mut work => return Some(done),
            _ = tokio::time::sleep_until(give_up_at) => {
                if progress.last() + stall <= Instant::now() {
                    return None;
                }
            }
        }
    }
}

/// The next piece of an answer's body, or `None` if nothing arrived within `stall`.
pub(crate) async fn within<T>(stall: Option<Duration>, next: impl Future<Output = T>) -> Option<T> {
    match stall {
        Some(stall) => tokio::time::timeout(stall, next).await.ok(),
        None => Some(next.await),
    }
}

/// `body` made to report every slice it hands to the connection to `progress`. A body held in
/// memory is cut into slices first, so that a large one shows progress as it goes.
pub(crate) fn watched(body: reqwest::Body, progress: Arc<Progress>) -> reqwest::Body {
    match body.as_bytes() {
        Some(bytes) => reqwest::Body::wrap(Sliced {
            rest: Bytes::copy_from_slice(bytes),
            progress,
        }),
        None => reqwest::Body::wrap(Watched {
            inner: body,
            progress,
        }),
    }
}

/// An in-memory body sent slice by slice.
struct Sliced {
    rest: Bytes,
    progress: Arc<Progress>,
}

impl HttpBody for Sliced {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let take = self.rest.len().min(SLICE);
        let slice = self.rest.split_to(take);
        self.progress.touch();
        Poll::Ready(Some(Ok(Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A streamed body whose frames are reported as they are handed on.
struct Watched {
    inner: reqwest::Body,
    progress: Arc<Progress>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.progress.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_that_keeps_moving_is_not_cut() {
        let progress = Progress::new();
        let mover = progress.clone();
        let work = async move {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                mover.touch();
            }
            "done"
        };
        // Eight times longer than the stall timeout in all, never silent for as long.
        let outcome = unless_stalled(&progress, Some(Duration::from_millis(300)), work).await;
        assert_eq!(outcome, Some("done"));
    }

    #[tokio::test]
    async fn a_silent_wait_ends_after_the_stall_timeout() {
        let progress = Progress::new();
        let started = Instant::now();
        let stall = Duration::from_millis(300);
        let outcome = unless_stalled(&progress, Some(stall), std::future::pending::<()>()).await;
        assert_eq!(outcome, None);
        let waited = started.elapsed();
        assert!(waited >= stall && waited < stall * 3, "{waited:?}");
    }

    #[tokio::test]
    async fn an_in_memory_body_goes_out_in_slices() {
        use http_body_util::BodyExt as _;
        let progress = Progress::new();
        let body = watched(
            reqwest::Body::from(vec![7u8; 3 * SLICE + 5]),
            progress.clone(),
        );
        assert_eq!(body.size_hint().exact(), Some(3 * SLICE as u64 + 5));
        let mut body = body;
        let mut frames = 0;
        let mut total = 0;
        while let Some(frame) = body.frame().await {
            total += frame.unwrap().into_data().unwrap().len();
            frames += 1;
        }
        assert_eq!((frames, total), (4, 3 * SLICE + 5));
        assert!(progress.last.load(Ordering::Relaxed) > 0);
    }
}

//! Cancelling a running step from another thread.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A handle that cancels the steps it was passed to. Cloning gives another handle to the same
/// cancellation; once cancelled it stays cancelled, and a step started with it afterwards is
/// not run at all.
///
/// Cancelling kills every process of the step; the step's `run` then returns
/// [`crate::SandboxError::Cancelled`] after its processes are gone and its mount targets removed.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    next_id: AtomicU64,
    /// Write ends of the wake-up pipes of the steps running with this token.
    wakers: Mutex<Vec<(u64, Arc<OwnedFd>)>>,
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels every step running with this token, and every later one.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        let wakers = self.inner.wakers.lock().unwrap_or_else(|e| e.into_inner());
        for (_, fd) in wakers.iter() {
            // SAFETY: writes one byte from a live local into a pipe fd kept open by the Arc.
            // The pipe is non-blocking; a full pipe (EAGAIN) already means "wake up".
            unsafe { libc::write(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Registers a wake-up pipe; the returned guard unregisters it.
    pub(crate) fn register(&self, write_end: Arc<OwnedFd>) -> Registration<'_> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, write_end));
        Registration { token: self, id }
    }
}

/// Keeps a step's wake-up pipe registered while the step runs.
pub(crate) struct Registration<'a> {
    token: &'a CancelToken,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.token
            .inner
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

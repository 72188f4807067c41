//! [`Cancel`]: stopping a build from outside (a signal handler, a caller's timeout) so that it
//! ends as soon as it can, with nothing tagged and nothing left mounted.

use std::future::Future;
use std::sync::Arc;

use kiln_sandbox::CancelToken;
use tokio::sync::watch;

use crate::error::BuildError;

/// A handle that cancels the builds it was given to ([`crate::Builder::cancel_with`]).
///
/// Cheap to clone; every clone cancels the same builds. Once cancelled it stays cancelled. A
/// cancelled build kills the processes of the step running, stops waiting for pulls, uploads
/// and fetches, stops unpacking at the next read (deleting the half-unpacked tree), pushes no
/// manifest, writes no digest file, unmounts what it mounted, removes its work dir and returns
/// [`BuildError::Cancelled`]. A build whose manifests are all pushed before the cancellation
/// finishes normally.
#[derive(Clone)]
pub struct Cancel {
    inner: Arc<Inner>,
}

struct Inner {
    /// Kills the processes of running steps (the sandbox's own mechanism).
    steps: CancelToken,
    /// Wakes async waits up.
    flag: watch::Sender<bool>,
}

impl Default for Cancel {
    fn default() -> Self {
        Cancel {
            inner: Arc::new(Inner {
                steps: CancelToken::new(),
                flag: watch::Sender::new(false),
            }),
        }
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Cancel {
    /// A handle that is not cancelled.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Cancels every build this handle was given to. Safe to call from any thread, any number
    /// of times; returns at once (the builds wind down on their own threads).
    pub fn cancel(&self) {
        self.inner.flag.send_replace(true);
        self.inner.steps.cancel();
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        *self.inner.flag.borrow()
    }

    /// Resolves once [`Cancel::cancel`] is called (at once if it was).
    pub async fn cancelled(&self) {
        let mut flag = self.inner.flag.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = flag.wait_for(|cancelled| *cancelled).await;
    }

    /// The token that kills a running step's processes.
    pub(crate) fn steps(&self) -> &CancelToken {
        &self.inner.steps
    }

    /// `Err(Cancelled)` once cancelled: checked between steps and before every manifest PUT.
    pub(crate) fn check(&self) -> Result<(), BuildError> {
        if self.is_cancelled() {
            Err(BuildError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Runs `work` until it ends or the build is cancelled, whichever comes first; on
    /// cancellation `work` is dropped (which aborts its requests).
    pub(crate) async fn guard<F: Future>(&self, work: F) -> Result<F::Output, BuildError> {
        tokio::select! {
            biased;
            () = self.cancelled() => Err(BuildError::Cancelled),
            output = work => Ok(output),
        }
    }

    /// [`Cancel::guard`] from a blocking thread, running `work` on `runtime`.
    pub(crate) fn block_on<F: Future>(
        &self,
        runtime: &tokio::runtime::Handle,
        work: F,
    ) -> Result<F::Output, BuildError> {
        runtime.block_on(self.guard(work))
    }

    /// Wraps a reader so that it fails at its next read once the build is cancelled: an unpack
    /// reading it stops there, and its caller removes what it had written.
    pub(crate) fn reader<R: std::io::Read>(&self, inner: R) -> CancelRead<R> {
        CancelRead {
            inner,
            cancel: self.clone(),
        }
    }
}

/// A reader that fails once its build is cancelled ([`Cancel::reader`]).
pub(crate) struct CancelRead<R> {
    inner: R,
    cancel: Cancel,
}

impl<R: std::io::Read> std::io::Read for CancelRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            // Not `Interrupted`: readers retry that kind.
            return Err(std::io::Error::other("the build was cancelled"));
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[tokio::test]
    async fn cancelling_wakes_waiters_and_stops_guarded_work() {
        let cancel = Cancel::new();
        let clone = cancel.clone();
        let waiter = tokio::spawn(async move { clone.cancelled().await });
        assert!(!cancel.is_cancelled());
        assert!(cancel.guard(async { 7 }).await.is_ok_and(|v| v == 7));
        let never = cancel.clone();
        let guarded = tokio::spawn(async move {
            never
                .guard(futures::future::pending::<()>())
                .await
                .map_err(|e| e.to_string())
        });
        cancel.cancel();
        waiter.await.unwrap();
        assert_eq!(
            guarded.await.unwrap(),
            Err(BuildError::Cancelled.to_string())
        );
        assert!(cancel.steps().is_cancelled());
        assert!(matches!(cancel.check(), Err(BuildError::Cancelled)));
        // Cancelled before the wait starts: resolves at once.
        cancel.cancelled().await;
    }

    #[test]
    fn a_cancelled_reader_fails_at_its_next_read() {
        let cancel = Cancel::new();
        let mut reader = cancel.reader(&b"abcdef"[..]);
        let mut buf = [0u8; 3];
        assert_eq!(reader.read(&mut buf).unwrap(), 3);
        cancel.cancel();
        assert!(reader.read(&mut buf).is_err());
    }
}

//! SIGTERM and SIGINT during a build: a Pod being deleted, a pipeline job being stopped, a
//! person pressing Ctrl-C.
//!
//! The first signal cancels the build ([`kiln_engine::Cancel`]): the step's processes are
//! killed, transfers stop, nothing is tagged, and the executor exits with `128 + signal` (143 for
//! SIGTERM, 130 for SIGINT) once the build has removed its mounts and work dir. A build whose
//! manifests were already pushed when the signal came finishes and exits 0: the image is there,
//! and reporting a failure would be a lie. A second signal exits at once, without cleaning up
//! (the next build sweeps what is left).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use kiln_engine::Cancel;
use tokio::signal::unix::{signal, SignalKind};

/// Watches for SIGTERM and SIGINT while a build runs; see the module comment.
pub struct Interrupts {
    received: Arc<AtomicI32>,
}

impl Interrupts {
    /// Installs the handlers on `runtime` and cancels `cancel` on the first signal. From here
    /// on the signals no longer kill the process by themselves.
    pub fn install(
        runtime: &tokio::runtime::Runtime,
        cancel: Cancel,
        notify: impl Fn(&str) + Send + 'static,
    ) -> std::io::Result<Interrupts> {
        let _entered = runtime.enter();
        // Registered here, before the build starts, so no signal falls between the start and
        // a task that has not yet run.
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let received = Arc::new(AtomicI32::new(0));
        let seen = Arc::clone(&received);
        runtime.spawn(async move {
            loop {
                let (number, name) = tokio::select! {
                    _ = terminate.recv() => (libc::SIGTERM, "SIGTERM"),
                    _ = interrupt.recv() => (libc::SIGINT, "SIGINT"),
                };
                if seen.swap(number, Ordering::SeqCst) != 0 {
                    notify(&format!("{name} again: exiting without cleaning up"));
                    std::process::exit(128 + number);
                }
                notify(&format!(
                    "{name} received: stopping the build (a second signal exits at once)"
                ));
                cancel.cancel();
            }
        });
        Ok(Interrupts { received })
    }

    /// The signal received first, if any.
    pub fn received(&self) -> Option<i32> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            number => Some(number),
        }
    }

    /// The exit code of a build that failed after a signal: `128 + signal`.
    pub fn exit_code(&self) -> Option<i32> {
        self.received().map(|number| 128 + number)
    }
}

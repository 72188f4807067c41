//! Where the client reads the time when it decides whether a cached Bearer token is still good,
//! so that tests can move time forward instead of waiting for a token to expire.

use std::fmt::Debug;
use std::time::{Instant, SystemTime};

/// The time source of a [`Client`](crate::Client)'s token cache. A client made with
/// [`Client::new`](crate::Client::new) uses the operating system's clocks; one made with
/// [`Client::with_clock`](crate::Client::with_clock) uses the clock it is given, which is how
/// tests see tokens expire without sleeping.
pub trait Clock: Debug + Send + Sync {
    /// Now on a monotonic clock: cached tokens expire at an instant of this clock.
    fn now(&self) -> Instant;

    /// Now on the wall clock: a token answer's `issued_at` is compared with it to learn how
    /// much of the token's lifetime is left.
    fn system_now(&self) -> SystemTime;
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }
}

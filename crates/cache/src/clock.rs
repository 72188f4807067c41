//! Where the cache reads the time: entries and stage records are stamped with it when written
//! and aged against it when read. A seam so tests can age entries without waiting.

use std::fmt::Debug;
use std::time::SystemTime;

/// The time source of a [`CacheStore`](crate::CacheStore): the operating system's wall clock
/// unless one is given with [`CacheStore::with_clock`](crate::CacheStore::with_clock).
pub trait Clock: Debug + Send + Sync {
    /// Now, on the wall clock (entry ages are whole seconds of it, as stored in the entries).
    fn now(&self) -> SystemTime;
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

//! Where the reconciler reads the time for its deferred deletions: the
//! process's monotonic clock, or in tests a clock that moves only when told
//! to, so they never sleep.

use std::time::Instant;
#[cfg(test)]
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

/// Where the reconciler reads the time for its deferred deletions.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic clock of the process.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[cfg(test)]
/// A clock that moves only when told to, shared by its clones: tests
/// advance it past the grace period instead of sleeping.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<Instant>>);

#[cfg(test)]
impl Default for ManualClock {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
}

#[cfg(test)]
impl ManualClock {
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += by;
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

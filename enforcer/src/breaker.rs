//! The circuit breaker in front of the token store.
//!
//! After `failures` consecutive failures (errors or timeouts) it opens: decisions stop waiting on
//! the store and follow `on_store_failure` at once. After `open_for` it lets one probe through
//! (half-open); the probe's success closes it, its failure opens it again. It never needs an
//! operator to close.
use parking_lot::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Breaker position, as exported in the `enforcer_store_breaker_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go to the store.
    Closed = 0,
    /// Calls are refused without trying.
    Open = 1,
    /// One probe call is in flight.
    HalfOpen = 2,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// A consecutive-failure circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    failures_to_open: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(failures_to_open: u32, open_for: Duration) -> Self {
        Self {
            failures_to_open: failures_to_open.max(1),
            open_for,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    /// Whether a call may go to the store now.
    pub fn admit(&self) -> bool {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        match *inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } if now >= until => {
                *inner = Inner::HalfOpen { since: now };
                true
            }
            Inner::Open { .. } => false,
            // A probe that never reported (its caller was cancelled) must not wedge the breaker.
            Inner::HalfOpen { since } if now.duration_since(since) >= self.open_for => {
                *inner = Inner::HalfOpen { since: now };
                true
            }
            Inner::HalfOpen { .. } => false,
        }
    }

    /// Reports the result of an admitted call.
    pub fn record(&self, ok: bool) {
        let mut inner = self.inner.lock();
        *inner = match (&*inner, ok) {
            (_, true) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, false) if failures + 1 < self.failures_to_open => {
                Inner::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => Inner::Open {
                until: Instant::now() + self.open_for,
            },
        };
    }

    /// The current position.
    pub fn state(&self) -> BreakerState {
        match *self.inner.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How long it stays open (used as the `Retry-After` of fail-closed denials).
    pub fn open_for(&self) -> Duration {
        self.open_for
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_by_itself() {
        let b = Breaker::new(3, Duration::from_secs(1));
        for _ in 0..2 {
            assert!(b.admit());
            b.record(false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit());
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.admit());

        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(b.admit(), "one probe after open_for");
        assert!(!b.admit(), "only one probe at a time");
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_and_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(1));
        b.record(false);
        b.record(true);
        b.record(false);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "the success reset the count"
        );
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.admit());
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_probe_does_not_wedge_it() {
        let b = Breaker::new(1, Duration::from_secs(1));
        b.record(false);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.admit());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.admit(), "a new probe once the old one is overdue");
    }
}

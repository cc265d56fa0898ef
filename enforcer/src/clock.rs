//! Time source for the in-process token store.
//!
//! The Redis store never uses this: it takes Redis server `TIME` inside the Lua script, so that
//! nodes with skewed clocks cannot double-spend (seed pitfall 2). The in-process store has one
//! node and one clock; tests drive it with [`ManualClock`].
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock seconds since the Unix epoch, with sub-second precision.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in seconds.
    fn now(&self) -> f64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

/// A clock that only moves when told to (microsecond resolution).
#[derive(Debug, Default, Clone)]
pub struct ManualClock {
    micros: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `seconds`.
    pub fn at(seconds: f64) -> Self {
        let clock = Self::default();
        clock.set(seconds);
        clock
    }

    /// Moves the clock to `seconds`.
    pub fn set(&self, seconds: f64) {
        self.micros
            .store((seconds * 1_000_000.0) as u64, Ordering::SeqCst);
    }

    /// Moves the clock forward by `seconds`.
    pub fn advance(&self, seconds: f64) {
        self.micros
            .fetch_add((seconds * 1_000_000.0) as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> f64 {
        self.micros.load(Ordering::SeqCst) as f64 / 1_000_000.0
    }
}

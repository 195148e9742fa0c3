//! Time source shared by the cores: the monotonic clock in production, a manual clock in tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Nanoseconds on a monotonic scale whose zero is the clock's creation (or the manual start).
#[derive(Clone, Debug)]
pub enum Clock {
    Monotonic(Instant),
    Manual(Arc<ManualTime>),
}

impl Clock {
    pub fn monotonic() -> Self {
        Clock::Monotonic(Instant::now())
    }

    #[inline]
    pub fn now_nanos(&self) -> u64 {
        match self {
            // A u64 of nanoseconds lasts 584 years, so the cast never truncates in practice.
            Clock::Monotonic(origin) => origin.elapsed().as_nanos() as u64,
            Clock::Manual(time) => time.now_nanos(),
        }
    }
}

/// A clock that moves only when told to, so tests of time-dependent behaviour never sleep.
#[derive(Debug, Default)]
pub struct ManualTime {
    nanos: AtomicU64,
}

impl ManualTime {
    pub fn new(start_nanos: u64) -> Self {
        ManualTime {
            nanos: AtomicU64::new(start_nanos),
        }
    }

    #[inline]
    pub fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::Acquire)
    }

    pub fn advance(&self, nanos: u64) {
        self.nanos.fetch_add(nanos, Ordering::AcqRel);
    }

    /// Moves the clock to `nanos`; a monotonic clock never goes back, so an earlier time is refused.
    pub fn set(&self, nanos: u64) -> Result<(), u64> {
        let mut current = self.nanos.load(Ordering::Acquire);
        loop {
            if nanos < current {
                return Err(current);
            }
            match self.nanos.compare_exchange_weak(
                current,
                nanos,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }
}

/// Converts seconds given by a user into nanoseconds, refusing what no clock can represent.
pub fn seconds_to_nanos(seconds: f64) -> Option<u64> {
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    let nanos = seconds * 1e9;
    if nanos >= u64::MAX as f64 {
        return None;
    }
    Some(nanos.round() as u64)
}

pub fn nanos_to_seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

/// `from + wait`, or a century on for a wait longer than an `Instant` can hold: a caller's
/// "as long as it takes" must not overflow.
pub fn instant_after(from: std::time::Instant, wait: std::time::Duration) -> std::time::Instant {
    from.checked_add(wait)
        .unwrap_or_else(|| from + std::time::Duration::from_secs(100 * 365 * 86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_forward_only() {
        let time = ManualTime::new(5);
        time.advance(10);
        assert_eq!(time.now_nanos(), 15);
        assert_eq!(time.set(10), Err(15));
        assert_eq!(time.set(20), Ok(()));
        assert_eq!(time.now_nanos(), 20);
    }

    #[test]
    fn seconds_conversion_rejects_nonsense() {
        assert_eq!(seconds_to_nanos(1.5), Some(1_500_000_000));
        assert_eq!(seconds_to_nanos(-1.0), None);
        assert_eq!(seconds_to_nanos(f64::NAN), None);
        assert_eq!(seconds_to_nanos(f64::INFINITY), None);
    }

    #[test]
    fn monotonic_clock_does_not_go_back() {
        let clock = Clock::monotonic();
        let a = clock.now_nanos();
        let b = clock.now_nanos();
        assert!(b >= a);
    }
}

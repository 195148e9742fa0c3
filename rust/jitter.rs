//! A small shared random stream for jitter: spreading deadlines so many timers don't fire at once.
//! Not for anything that needs unpredictability.

use std::sync::atomic::{AtomicU64, Ordering};

/// A splitmix64 stream advanced with one atomic add, so threads draw from it without a lock.
#[derive(Debug)]
pub struct JitterSource {
    state: AtomicU64,
}

impl JitterSource {
    pub fn new(seed: u64) -> Self {
        JitterSource {
            state: AtomicU64::new(seed ^ 0x9E37_79B9_7F4A_7C15),
        }
    }

    /// A uniform draw in [0, 1).
    pub fn next_unit(&self) -> f64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_the_unit_interval_and_spread_out() {
        let source = JitterSource::new(42);
        let draws: Vec<f64> = (0..10_000).map(|_| source.next_unit()).collect();
        assert!(draws.iter().all(|draw| (0.0..1.0).contains(draw)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}

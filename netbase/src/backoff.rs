//! Reconnect delays: exponential from `min` to `max`, with jitter so that many clients
//! cut off at once do not come back at once. Pure: the caller supplies randomness.

use std::time::Duration;

/// Exponential backoff with "equal jitter" (each delay is drawn from `[d/2, d]`).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The delay before the next attempt; `unit` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self.failures.min(30);
        self.failures = self.failures.saturating_add(1);
        let full = self.min.saturating_mul(1u32 << exp.min(20)).min(self.max);
        let unit = unit.clamp(0.0, 1.0);
        full.mul_f64(0.5 + 0.5 * unit)
    }

    /// Call after a successful connection.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_then_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let top: Vec<_> = (0..10).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(top[0], Duration::from_millis(100));
        assert_eq!(top[1], Duration::from_millis(200));
        assert_eq!(top[5], Duration::from_millis(3200));
        assert_eq!(top[7], Duration::from_secs(10));
        assert_eq!(top[9], Duration::from_secs(10));
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        for i in 0..100 {
            let d = b.next_delay(i as f64 / 100.0);
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_secs(1));
        }
    }
}

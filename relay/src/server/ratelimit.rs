//! A token bucket, pure: the caller passes the time. Used for the per-client receive
//! limit (which waits, giving TCP back-pressure) and for the accept-rate limit (which
//! refuses).

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` tokens per second, at most `burst` saved up; starts full.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Takes `n` tokens if available.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if needed; returns how long to wait until the
    /// debt is repaid (zero when there was enough).
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_wait_proportional_to_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 2000.0, t0);
        assert_eq!(b.take(2000.0, t0), Duration::ZERO);
        assert_eq!(b.take(500.0, t0), Duration::from_millis(500));
        // Half a second later the debt is repaid.
        assert_eq!(b.take(0.0, t0 + Duration::from_millis(500)), Duration::ZERO);
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.take(2000.0, later), Duration::ZERO);
        assert!(b.take(1.0, later) > Duration::ZERO);
    }

    #[test]
    fn try_take_refuses_over_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0, t0);
        assert!(b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0 + Duration::from_millis(100)));
    }
}

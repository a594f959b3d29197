//! Capped exponential back-off with jitter, for retrying a CA that is down.
//!
//! Jitter spreads the retries of many workloads that failed together, so that
//! a CA coming back is not hit by all of them in the same instant.

use std::time::Duration;

/// Delays `base, 2·base, 4·base, …` up to `cap`, each scaled by a random
/// factor in `[0.5, 1.0]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The un-jittered delay of the next step.
    pub fn peek(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(30));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, jittered with `unit` in `[0, 1)` (a random number).
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let d = self.peek();
        self.attempt = self.attempt.saturating_add(1);
        d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// The next delay, randomly jittered.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        let steps: Vec<Duration> = (0..6).map(|_| b.next_with(1.0)).collect();
        let ms: Vec<u128> = steps.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_with(0.0), Duration::from_millis(250));
        for _ in 0..100 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(250) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
        assert_eq!(
            b.peek(),
            Duration::from_secs(5),
            "never past the cap, even after many steps"
        );
    }
}

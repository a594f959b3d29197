//! When to renew a certificate.
//!
//! At `NotAfter − ratio × lifetime`, the ratio jittered by up to ± `jitter` so
//! that identities issued together do not renew together. The times come from
//! the certificate itself, never from the TTL that was asked for: the CA's
//! role may have capped it. The lifetime starts at the later of `NotBefore`
//! and the moment the certificate was received, because CAs back-date
//! `NotBefore` (Vault by 30 s) and, with short certificates, counting that
//! slack would renew at once, again and again.

use std::time::{Duration, SystemTime};

/// The most of a lifetime that may be left at renewal.
const MAX_RATIO: f64 = 0.99;

/// Rotation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewPolicy {
    /// `SECRET_GRACE_PERIOD_RATIO`, in (0, 1).
    pub grace_ratio: f64,
    /// `SECRET_GRACE_PERIOD_RATIO_JITTER`, in [0, 1).
    pub jitter: f64,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        Self {
            grace_ratio: 0.5,
            jitter: 0.01,
        }
    }
}

impl RenewPolicy {
    /// The renewal time of a certificate whose life runs from `start` (the
    /// later of `NotBefore` and its arrival) to `not_after`; `unit` is a
    /// random number in `[0, 1)` choosing the jitter. Never sooner than 1% of
    /// the lifetime after `start`, so renewals cannot spin; never after
    /// `not_after`.
    pub fn renew_at(&self, start: SystemTime, not_after: SystemTime, unit: f64) -> SystemTime {
        let lifetime = not_after.duration_since(start).unwrap_or(Duration::ZERO);
        let offset = (unit.clamp(0.0, 1.0) * 2.0 - 1.0) * self.jitter;
        let ratio = (self.grace_ratio + offset).clamp(0.0, MAX_RATIO);
        not_after - lifetime.mul_f64(ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renews_at_the_ratio_of_the_real_lifetime() {
        let p = RenewPolicy {
            grace_ratio: 0.5,
            jitter: 0.0,
        };
        assert_eq!(p.renew_at(at(1000), at(2000), 0.3), at(1500));
        let p = RenewPolicy {
            grace_ratio: 0.25,
            jitter: 0.0,
        };
        assert_eq!(p.renew_at(at(0), at(86400), 0.9), at(64800));
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let p = RenewPolicy {
            grace_ratio: 0.5,
            jitter: 0.01,
        };
        // lifetime 10000 s: ratio 0.49..0.51 → renew between 4900 s and 5100 s after issue.
        assert_eq!(p.renew_at(at(0), at(10000), 0.0), at(5100));
        assert_eq!(p.renew_at(at(0), at(10000), 1.0), at(4900));
        assert_eq!(p.renew_at(at(0), at(10000), 0.5), at(5000));
        for i in 0..=100 {
            let t = p.renew_at(at(0), at(10000), i as f64 / 100.0);
            assert!(t >= at(4900) && t <= at(5100), "{t:?}");
        }
    }

    #[test]
    fn clamps_to_the_validity() {
        let p = RenewPolicy {
            grace_ratio: 0.995,
            jitter: 0.5,
        };
        assert_eq!(
            p.renew_at(at(100), at(200), 1.0),
            at(101),
            "never sooner than 1% of the lifetime"
        );
        let p = RenewPolicy {
            grace_ratio: 0.001,
            jitter: 0.5,
        };
        assert_eq!(
            p.renew_at(at(100), at(200), 0.0),
            at(200),
            "never after NotAfter"
        );
        // A certificate whose NotAfter is before its NotBefore renews at once.
        assert_eq!(p.renew_at(at(300), at(200), 0.5), at(200));
    }
}

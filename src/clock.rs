//! Wall-clock time, and its conversion to the tokio clock that timers use.
//!
//! Certificates and JWTs carry wall-clock times (`NotAfter`, `exp`), while
//! the agent waits with tokio timers. Everything that reads "now" or turns a
//! certificate time into a timer deadline goes through a [`Clock`], so that
//! tests can run the rotation schedule under paused tokio time
//! (`#[tokio::test(start_paused = true)]`): a [`Clock::paused_at`] clock moves
//! with tokio's clock, and a day of renewals takes milliseconds.
//!
//! The agent itself uses [`Clock::system`], which reads the system clock on
//! every call, so a wall clock that is stepped (NTP) is followed, not frozen
//! at start.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Where "now" comes from.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// `None`: the system clock. `Some`: wall time that advances with tokio's
    /// clock from this pair of readings.
    paused: Option<(SystemTime, Instant)>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { paused: None }
    }

    /// A clock that reads `epoch` now and then moves with tokio's clock, so
    /// that advancing paused tokio time advances it too. For tests.
    pub fn paused_at(epoch: SystemTime) -> Self {
        Self {
            paused: Some((epoch, Instant::now())),
        }
    }

    /// Now, in wall-clock time.
    pub fn now(&self) -> SystemTime {
        match self.paused {
            None => SystemTime::now(),
            Some((epoch, start)) => epoch + start.elapsed(),
        }
    }

    /// Now, in seconds since the Unix epoch (as JWTs count).
    pub fn unix_now(&self) -> i64 {
        self.now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    /// The tokio instant at which the wall clock will read `t` (now, when `t`
    /// is past). The wall clock is read first: were the thread held between
    /// the two readings, the instant comes late, never early.
    pub fn instant(&self, t: SystemTime) -> Instant {
        let wall = self.now();
        let now = Instant::now();
        match t.duration_since(wall) {
            Ok(ahead) => now.checked_add(ahead).unwrap_or(now + FAR),
            Err(_) => now,
        }
    }

    /// How long until the wall clock reads `t` (zero when past).
    pub fn until(&self, t: SystemTime) -> Duration {
        t.duration_since(self.now()).unwrap_or(Duration::ZERO)
    }
}

/// Far enough to mean "never" for a timer, small enough not to overflow.
const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// RFC 3339, to the second, for log lines.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|dt| {
            dt.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs}s since epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_paused_clock_moves_with_tokio_time_and_converts_both_ways() {
        let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Clock::paused_at(epoch);
        let start = Instant::now();
        assert_eq!(clock.now(), epoch);
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), epoch + Duration::from_secs(90));
        assert_eq!(clock.unix_now(), 1_000_090);

        let later = epoch + Duration::from_secs(100);
        assert_eq!(clock.instant(later), start + Duration::from_secs(100));
        assert_eq!(clock.until(later), Duration::from_secs(10));
        // The past is now, never earlier.
        assert_eq!(clock.instant(epoch), Instant::now());
        assert_eq!(clock.until(epoch), Duration::ZERO);
        // Far future does not overflow.
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64 * 100);
        assert!(clock.instant(far) > Instant::now());
    }

    #[test]
    fn rfc3339_for_logs() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}

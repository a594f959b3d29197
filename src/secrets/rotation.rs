//! The background life of one identity, from its first certificate until it
//! is forgotten: renew at the scheduled time while someone watches, retry
//! failures with back-off, end the streams when no credential is left, and
//! hand over to eviction while nobody watches.
//!
//! Times are certificate (wall-clock) times turned into tokio instants by
//! the manager's [`Clock`](crate::clock::Clock), so the schedule runs under
//! paused tokio time in tests.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::cache::{Entry, Forget};
use super::eviction::Idle;
use super::renew::Renewal;
use super::SecretManager;
use crate::backoff::Backoff;
use crate::clock::rfc3339;
use crate::metrics::{self, Retry};

/// Longest wait between renewal attempts once the certificate has expired.
pub(super) const EXPIRED_RETRY: Duration = Duration::from_secs(10);

impl SecretManager {
    /// Runs until `entry` is forgotten. Started once per entry, when its
    /// first certificate is installed.
    pub(super) async fn rotate(self: Arc<Self>, entry: Arc<Entry>) {
        let id = entry.key.identity.clone();
        let clock = self.opts.clock;
        // How often an unwatched identity looks at its watchers again.
        let tick =
            (self.opts.eviction / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
        let mut idle = Idle::default();
        let mut backoff = Backoff::new(self.opts.renew_backoff.0, self.opts.renew_backoff.1);
        let mut retry_at: Option<Instant> = None;
        let mut expired_logged = false;
        // Drawn once per certificate, so that the jitter holds still.
        let mut schedule: Option<(String, Instant)> = None;
        loop {
            let Some(secret) = entry.current() else {
                return;
            };
            let renew_at = match &schedule {
                Some((serial, at)) if *serial == secret.leaf.serial_hex => *at,
                _ => {
                    let start = secret.leaf.not_before.max(secret.received);
                    let at = self
                        .opts
                        .renew
                        .renew_at(start, secret.leaf.not_after, rand::random());
                    tracing::debug!(identity = %id, renew_at = %rfc3339(at), "renewal scheduled");
                    entry.renews_at(&secret.leaf.serial_hex, at);
                    schedule = Some((secret.leaf.serial_hex.clone(), clock.instant(at)));
                    retry_at = None;
                    clock.instant(at)
                }
            };
            let due = retry_at.unwrap_or(renew_at);
            let now = Instant::now();
            if now < due {
                tokio::time::sleep(due.saturating_duration_since(now).min(tick)).await;
            }
            if entry.watchers() == 0 {
                if idle.for_at_least(self.opts.eviction) && self.evict(&entry) {
                    return;
                }
                // Nobody to renew for: wait for a watcher or the eviction.
                if Instant::now() >= due {
                    tokio::time::sleep(tick).await;
                }
                continue;
            }
            idle.reset();
            if Instant::now() < due {
                continue;
            }
            if retry_at.is_some() {
                metrics::retry(Retry::Renewal);
            }
            match self.renew(&entry, &secret).await {
                Renewal::Renewed => {
                    metrics::rotation();
                    backoff.reset();
                    expired_logged = false;
                }
                Renewal::StoodDown => retry_at = None,
                Renewal::NoCredential(reason) => {
                    tracing::warn!(identity = %id, "{reason}");
                    if let Some(jwts) = self.cache.forget(&entry, Forget::NoCredential(&reason)) {
                        self.release(jwts);
                        return;
                    }
                    // A stream with a live JWT arrived meanwhile: try again soon.
                    retry_at = Some(Instant::now() + self.opts.renew_backoff.0);
                    entry.failed(&reason, Some(clock.now() + self.opts.renew_backoff.0));
                }
                Renewal::Failed(e) => {
                    // Never wait past half of what is left of the current
                    // certificate, nor more than 10 s once it has expired.
                    let left = clock.until(secret.leaf.not_after);
                    let valid = !left.is_zero();
                    let limit = if valid {
                        (left / 2).max(Duration::from_secs(1))
                    } else {
                        EXPIRED_RETRY
                    };
                    let delay = backoff.next_delay().min(limit);
                    retry_at = Some(Instant::now() + delay);
                    entry.failed(&e, Some(clock.now() + delay));
                    if valid {
                        tracing::error!(
                            identity = %id,
                            "failed to renew the certificate: {e}; still serving the current one (valid until {}), retrying in {:.1}s",
                            rfc3339(secret.leaf.not_after),
                            delay.as_secs_f64()
                        );
                    } else {
                        if !expired_logged {
                            tracing::error!(
                                identity = %id,
                                "certificate expired at {} without renewal; Envoy holds an expired certificate until the CA answers",
                                rfc3339(secret.leaf.not_after)
                            );
                            expired_logged = true;
                        }
                        tracing::error!(identity = %id, "failed to renew the certificate: {e}; retrying in {:.1}s", delay.as_secs_f64());
                    }
                }
            }
        }
    }
}

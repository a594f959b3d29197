//! The trust bundle's background task: when the CA's roots are read, when
//! the extra-roots file is checked, and when removals fall due.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::TrustBundle;
use crate::backoff::Backoff;

/// How often the extra-roots file is checked for changes.
pub const EXTRA_ROOTS_CHECK: Duration = Duration::from_secs(5);
/// Least time between two reads of the CA's roots that an issued chain asks for.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// The bundle's background life: reads the CA's roots at start, every
/// refresh interval (sooner after a failure, with back-off) and when asked;
/// checks the extra-roots file; applies removals when they fall due. Ends
/// when the bundle is dropped.
pub(super) async fn run(trust: Weak<TrustBundle>, wake: Arc<Notify>) {
    let Some(t) = trust.upgrade() else { return };
    let period = t.opts.refresh;
    let has_extra = t.opts.extra_roots.is_some();
    drop(t);
    let mut backoff = Backoff::new(Duration::from_secs(1), period);
    let mut next_refresh = Instant::now();
    let mut last_refresh: Option<Instant> = None;
    let mut next_extra = Instant::now() + EXTRA_ROOTS_CHECK;
    loop {
        let Some(t) = trust.upgrade() else { return };
        let now = Instant::now();
        if t.refresh_asked.load(Ordering::SeqCst) {
            let earliest = last_refresh.map_or(now, |l| l + MIN_REFRESH_GAP);
            next_refresh = next_refresh.min(earliest.max(now));
        }
        if now >= next_refresh {
            t.refresh_asked.store(false, Ordering::SeqCst);
            last_refresh = Some(now);
            next_refresh = if t.refresh().await {
                backoff.reset();
                Instant::now() + period
            } else {
                Instant::now() + backoff.next_delay()
            };
        }
        if has_extra && Instant::now() >= next_extra {
            t.check_extra();
            next_extra = Instant::now() + EXTRA_ROOTS_CHECK;
        }
        t.recompute(&mut t.lock());
        let mut until = next_refresh;
        if has_extra {
            until = until.min(next_extra);
        }
        if let Some(change) = t.next_change() {
            // Just past the boundary, so that the change is due when recomputed.
            until = until.min(change + Duration::from_millis(1));
        }
        drop(t);
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = wake.notified() => {}
        }
    }
}

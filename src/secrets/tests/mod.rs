//! The secret manager under paused tokio time, against a fake CA whose
//! certificates follow the same clock:
//! - [`schedule`]: renewal times, back-off, eviction;
//! - [`fetches`]: first fetches, the identity cap, one push per renewal;
//! - [`credentials`]: the JWTs renewals use, sign refusals;
//! - [`races`]: forgets racing subscribers, the CA queue and the fetch lock;
//! - [`report`]: what the status page and the metrics read of the cache.

mod credentials;
mod fetches;
mod races;
mod report;
mod schedule;

pub(super) use std::time::{Duration, SystemTime};

pub(super) use tokio::time::Instant;

pub(super) use super::test_support::{jwt, Call, FakeCa};
pub(super) use super::*;
pub(super) use crate::ca::CaFailure;

pub(super) struct Harness {
    pub ca: Arc<FakeCa>,
    pub m: Arc<SecretManager>,
    pub clock: Clock,
}

/// A manager whose certificates live 100 s and renew at half their life
/// (no jitter), with back-off from 1 s.
pub(super) fn harness(f: impl FnOnce(&mut ManagerOptions)) -> Harness {
    let clock = Clock::paused_at(SystemTime::now());
    let ca = FakeCa::new(clock);
    let mut opts = ManagerOptions::new("td", KeyType::EcP256, Duration::from_secs(100));
    opts.clock = clock;
    opts.renew = RenewPolicy {
        grace_ratio: 0.5,
        jitter: 0.0,
    };
    opts.renew_backoff = (Duration::from_secs(1), Duration::from_secs(100_000));
    f(&mut opts);
    let m = test_support::manager(ca.clone(), opts);
    Harness { ca, m, clock }
}

impl Harness {
    pub fn unix(&self, in_secs: i64) -> i64 {
        self.clock.unix_now() + in_secs
    }
}

pub(super) fn serial(sub: &Subscription) -> String {
    sub.secret
        .borrow()
        .secret
        .as_ref()
        .map(|s| s.leaf.serial_hex.clone())
        .unwrap_or_default()
}

/// Waits (in paused time) until the subscription's certificate differs from
/// `old`, or it is closed; panics after `within`.
pub(super) async fn next_cert(sub: &mut Subscription, old: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        {
            let state = sub.secret.borrow_and_update();
            if state.closed.is_some()
                || state.secret.as_ref().map(|s| s.leaf.serial_hex.as_str()) != Some(old)
            {
                return;
            }
        }
        tokio::time::timeout_at(deadline, sub.secret.changed())
            .await
            .expect("no new certificate in time")
            .unwrap();
    }
}

pub(super) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The fake CA's calls after the first `since`, except listings of its roots.
pub(super) fn calls_since(ca: &FakeCa, since: usize) -> Vec<(Instant, Call)> {
    ca.calls()
        .into_iter()
        .skip(since)
        .filter(|(_, c)| *c != Call::ListRoots)
        .collect()
}

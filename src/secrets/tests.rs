//! The secret manager under paused tokio time, against a fake CA whose
//! certificates follow the same clock: the renewal schedule, back-off,
//! eviction, the JWTs renewals use, and the races the cache's states rule out.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::test_support::{jwt, Call, FakeCa};
use super::*;
use crate::ca::CaFailure;
use crate::trust::TrustOptions;

struct Harness {
    ca: Arc<FakeCa>,
    m: Arc<SecretManager>,
    clock: Clock,
}

/// A manager whose certificates live 100 s and renew at half their life
/// (no jitter), with back-off from 1 s.
fn harness(f: impl FnOnce(&mut ManagerOptions)) -> Harness {
    let clock = Clock::paused_at(SystemTime::now());
    let ca = FakeCa::new(clock);
    let trust = TrustBundle::start(
        ca.clone(),
        TrustOptions {
            clock,
            ..TrustOptions::default()
        },
    )
    .unwrap();
    let mut opts = ManagerOptions::new("td", KeyType::EcP256, Duration::from_secs(100));
    opts.clock = clock;
    opts.renew = RenewPolicy {
        grace_ratio: 0.5,
        jitter: 0.0,
    };
    opts.renew_backoff = (Duration::from_secs(1), Duration::from_secs(100_000));
    f(&mut opts);
    let m = SecretManager::new(ca.clone(), trust, opts);
    Harness { ca, m, clock }
}

impl Harness {
    fn unix(&self, in_secs: i64) -> i64 {
        self.clock.unix_now() + in_secs
    }
}

fn serial(sub: &Subscription) -> String {
    sub.secret
        .borrow()
        .secret
        .as_ref()
        .map(|s| s.leaf.serial_hex.clone())
        .unwrap_or_default()
}

/// Waits (in paused time) until the subscription's certificate differs from
/// `old`, or it is closed; panics after `within`.
async fn next_cert(sub: &mut Subscription, old: &str, within: Duration) {
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

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_the_lifetime_again_and_again() {
    let h = harness(|_| {});
    let start = Instant::now();
    let mut sub = h.m.subscribe(&jwt("a", None)).await.unwrap();
    for round in 1..=3 {
        let before = serial(&sub);
        tokio::time::sleep_until(start + Duration::from_secs(50 * round - 2)).await;
        assert_eq!(
            h.ca.signs(),
            round as usize,
            "nothing before the renewal time"
        );
        next_cert(&mut sub, &before, Duration::from_secs(5)).await;
        let at = secs(start.elapsed());
        // NotAfter has whole seconds: the lifetime is 99-100 s, renewal at its half.
        assert!(
            at >= 49.0 * round as f64 && at <= 50.5 * round as f64,
            "round {round} at {at}"
        );
        assert_eq!(h.ca.signs(), round as usize + 1);
    }
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_back_off_never_past_half_the_remaining_validity() {
    let h = harness(|o| o.ttl = Duration::from_secs(1000));
    let mut sub = h.m.subscribe(&jwt("a", None)).await.unwrap();
    let not_after = sub.secret.borrow().secret.as_ref().unwrap().leaf.not_after;
    let expiry = h.clock.instant(not_after);
    let first = serial(&sub);
    *h.ca.sign_error.lock().unwrap() = Some(CaError::Unavailable("down".into()));
    // Until a minute past expiry.
    tokio::time::sleep(h.clock.until(not_after) + Duration::from_secs(60)).await;
    let attempts: Vec<Instant> =
        h.ca.calls()
            .into_iter()
            .filter(|(_, c)| matches!(c, Call::Sign(_)))
            .map(|(t, _)| t)
            .skip(1)
            .collect();
    assert!(attempts.len() >= 8, "{} attempts", attempts.len());
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    // Doubling from 1 s, jittered to [0.5, 1] of each step.
    for (k, gap) in gaps.iter().take(4).enumerate() {
        let step = 2f64.powi(k as i32);
        assert!(
            secs(*gap) >= 0.5 * step - 0.01 && secs(*gap) <= step + 0.01,
            "gap {k} is {gap:?}: {gaps:?}"
        );
    }
    for (t, gap) in attempts.iter().zip(&gaps) {
        if *t < expiry {
            // Never past half of what is left (at least 1 s).
            let half_left = (expiry - *t) / 2;
            assert!(
                *gap <= half_left.max(Duration::from_secs(1)) + Duration::from_millis(10),
                "waited {gap:?} with {:?} left",
                expiry - *t
            );
        } else {
            assert!(
                *gap <= Duration::from_secs(10) + Duration::from_millis(10),
                "{gap:?} after expiry"
            );
        }
    }
    let before_expiry = attempts.iter().filter(|t| **t < expiry).count();
    let last_before = attempts.iter().rev().find(|t| **t < expiry).unwrap();
    assert!(
        expiry - *last_before <= Duration::from_secs(2),
        "kept trying up to the expiry"
    );
    assert!(
        before_expiry < 40,
        "{before_expiry}: backed off, not hammering"
    );
    assert_eq!(serial(&sub), first, "the current certificate stays served");

    // The CA is back: renewed within the 10 s retry of an expired certificate.
    *h.ca.sign_error.lock().unwrap() = None;
    next_cert(&mut sub, &first, Duration::from_secs(11)).await;
    assert!(sub.secret.borrow().closed.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_identity_nobody_watches_is_evicted_after_the_period_and_its_jwts_released() {
    let h = harness(|o| {
        o.eviction = Duration::from_secs(1000);
        o.ttl = Duration::from_secs(100_000);
    });
    let a = jwt("a", None);
    let watched = h.m.subscribe(&jwt("w", None)).await.unwrap();
    let sub = h.m.subscribe(&a).await.unwrap();
    drop(sub);
    let dropped = Instant::now();
    tokio::time::sleep(Duration::from_secs(999)).await;
    assert_eq!(h.m.cached_identities(), 2, "not before the period");
    // The idle check runs every quarter period.
    tokio::time::sleep(Duration::from_secs(251 + 250)).await;
    assert_eq!(
        h.m.cached_identities(),
        1,
        "evicted {:?} after",
        dropped.elapsed()
    );
    tokio::task::yield_now().await;
    assert_eq!(
        h.ca.count(|c| *c == Call::Release(a.fingerprint())),
        1,
        "its JWT released"
    );
    // The watched one stays, however long.
    tokio::time::sleep(Duration::from_secs(50_000)).await;
    assert_eq!(h.m.cached_identities(), 1);
    assert!(watched.secret.borrow().closed.is_none());
}

#[tokio::test(start_paused = true)]
async fn nobody_watching_means_no_renewal() {
    let h = harness(|o| o.eviction = Duration::from_secs(10_000));
    let sub = h.m.subscribe(&jwt("a", None)).await.unwrap();
    drop(sub);
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(h.ca.signs(), 1);
    assert_eq!(
        h.m.cached_identities(),
        1,
        "kept (until evicted), not renewed"
    );
    // Watched again: the expired certificate is replaced at once, by a first fetch.
    let sub = h.m.subscribe(&jwt("a", None)).await.unwrap();
    assert_eq!(h.ca.signs(), 2);
    assert!(sub.secret.borrow().secret.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_failed_or_abandoned_first_fetch_leaves_no_entry() {
    let h = harness(|_| {});
    *h.ca.sign_error.lock().unwrap() = Some(CaError::Unavailable("down".into()));
    let e = h.m.subscribe(&jwt("a", None)).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(h.m.cached_identities(), 0);
    *h.ca.sign_error.lock().unwrap() = None;

    let refused = jwt("b", None);
    h.ca.reject(&refused);
    assert!(h.m.subscribe(&refused).await.is_err());
    assert_eq!(h.m.cached_identities(), 0);

    // A subscriber that gives up while its CA request runs.
    *h.ca.sign_latency.lock().unwrap() = Duration::from_secs(30);
    let m = h.m.clone();
    let task = tokio::spawn(async move { m.subscribe(&jwt("c", None)).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.m.cached_identities(), 1, "fetching");
    task.abort();
    let _ = task.await;
    assert_eq!(h.m.cached_identities(), 0);

    // Positive control: the same calls succeed and stay cached.
    *h.ca.sign_latency.lock().unwrap() = Duration::ZERO;
    let _ok = h.m.subscribe(&jwt("c", None)).await.unwrap();
    assert_eq!(h.m.cached_identities(), 1);
}

#[tokio::test(start_paused = true)]
async fn identities_past_the_cap_are_refused_without_asking_the_ca() {
    let h = harness(|o| o.max_identities = 2);
    let _a = h.m.subscribe(&jwt("a", None)).await.unwrap();
    let _b = h.m.subscribe(&jwt("b", None)).await.unwrap();
    let calls = h.ca.calls().len();
    let c = jwt("c", None);
    match h.m.subscribe(&c).await {
        Err(SecretError::LimitReached { setting, .. }) => assert_eq!(setting, "MAX_IDENTITIES"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.ca.calls().len(), calls, "the CA was not asked");
    // A known identity is still served.
    assert!(h.m.subscribe(&jwt("a", None)).await.is_ok());
}

/// What a stream would push: the leaf and the bundle.
type Pushes = Arc<std::sync::Mutex<Vec<(String, Vec<String>)>>>;

/// Counts pushes as an SDS stream serving both resources would: one per
/// change of the (certificate, bundle) versions it observes.
async fn observe_pushes(mut rx: SecretWatch, log: Pushes) {
    let mut last = None;
    while rx.changed().await.is_ok() {
        let state = rx.borrow_and_update().clone();
        let Some(secret) = state.secret else { continue };
        let now = (secret.cert_version(), state.roots.version());
        if last.as_ref() != Some(&now) {
            last = Some(now);
            log.lock().unwrap().push((
                crate::crypto::split_pem_certs(&secret.chain_pem).unwrap()[0].clone(),
                state.roots.pems.clone(),
            ));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_renewal_onto_a_new_root_is_one_change_holding_both() {
    let h = harness(|_| {});
    let mut sub = h.m.subscribe(&jwt("a", None)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old_root = h.ca.root_pem(0);
    assert_eq!(
        sub.secret.borrow().roots.pems,
        std::slice::from_ref(&old_root)
    );
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(observe_pushes(sub.secret.clone(), log.clone()));

    // The CA's new root signs from now on (and is listed with the old one).
    let new = h.ca.add_root(Duration::from_secs(20 * 365 * 86400));
    h.ca.set_listing(Ok(vec![0, new]));
    *h.ca.signing.lock().unwrap() = new;
    let before = serial(&sub);
    next_cert(&mut sub, &before, Duration::from_secs(60)).await;
    // Let the trust bundle's refresh and its fan-out run.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let pushes = log.lock().unwrap().clone();
    assert_eq!(
        pushes.len(),
        1,
        "one push for the renewal: {:?}",
        pushes.iter().map(|p| p.1.len()).collect::<Vec<_>>()
    );
    let (_, roots) = &pushes[0];
    assert!(
        roots.contains(&h.ca.root_pem(new)),
        "the new certificate came with its root"
    );
    assert!(
        roots.contains(&old_root),
        "and the old root stays: the CA lists it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_renewal_uses_another_live_jwt_when_the_ca_rejects_one() {
    let h = harness(|_| {});
    let (a, b) = (
        jwt("x", Some(h.unix(10_000))),
        jwt("x", Some(h.unix(20_000))),
    );
    let mut sub_a = h.m.subscribe(&a).await.unwrap();
    let _sub_b = h.m.subscribe(&b).await.unwrap();
    // b's pod is deleted: its token is gone and Vault now refuses its JWT.
    h.ca.drop_tokens();
    h.ca.reject(&b);
    let before = serial(&sub_a);
    next_cert(&mut sub_a, &before, Duration::from_secs(60)).await;
    assert!(sub_a.secret.borrow().closed.is_none(), "renewed, not ended");
    let logins: Vec<Call> =
        h.ca.calls()
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| matches!(c, Call::Login(_)))
            .collect();
    assert_eq!(
        logins[2..],
        [Call::Login(b.fingerprint()), Call::Login(a.fingerprint())],
        "the JWT expiring last first, then the next"
    );
    tokio::task::yield_now().await;
    assert_eq!(
        h.ca.count(|c| *c == Call::Release(b.fingerprint())),
        1,
        "the rejected JWT is released"
    );

    // Next renewal: b was forgotten, a's cached login serves.
    let before = serial(&sub_a);
    let logins_now = h.ca.count(|c| matches!(c, Call::Login(_)));
    next_cert(&mut sub_a, &before, Duration::from_secs(60)).await;
    assert_eq!(h.ca.count(|c| matches!(c, Call::Login(_))), logins_now);
}

#[tokio::test(start_paused = true)]
async fn streams_end_with_a_reason_only_when_no_jwt_is_left() {
    let h = harness(|_| {});
    let (a, b) = (jwt("x", None), jwt("x", None));
    let mut sub_a = h.m.subscribe(&a).await.unwrap();
    let sub_b = h.m.subscribe(&b).await.unwrap();
    h.ca.drop_tokens();
    h.ca.reject(&a);
    h.ca.reject(&b);
    let before = serial(&sub_a);
    next_cert(&mut sub_a, &before, Duration::from_secs(60)).await;
    for sub in [&sub_a, &sub_b] {
        let reason = sub.secret.borrow().closed.clone().expect("closed");
        assert!(reason.contains("2 rejected by the CA"), "{reason}");
    }
    assert_eq!(h.m.cached_identities(), 0);
}

#[tokio::test(start_paused = true)]
async fn every_jwt_expired_ends_the_streams_saying_so() {
    let h = harness(|_| {});
    let mut sub = h.m.subscribe(&jwt("x", Some(h.unix(30)))).await.unwrap();
    let before = serial(&sub);
    next_cert(&mut sub, &before, Duration::from_secs(60)).await;
    let reason = sub.secret.borrow().closed.clone().expect("closed");
    assert!(
        reason.contains("every JWT known for spiffe://td/ns/ns/sa/x has expired"),
        "{reason}"
    );
    assert_eq!(
        h.ca.count(|c| matches!(c, Call::Login(_))),
        1,
        "an expired JWT is never sent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_jwt_leaves_the_renewal_set_when_its_last_stream_ends() {
    let h = harness(|_| {});
    // a expires last, so it would be tried first while live.
    let (a, b) = (
        jwt("x", Some(h.unix(20_000))),
        jwt("x", Some(h.unix(10_000))),
    );
    let sub_a1 = h.m.subscribe(&a).await.unwrap();
    let sub_a2 = h.m.subscribe(&a).await.unwrap();
    let mut sub_b = h.m.subscribe(&b).await.unwrap();
    drop(sub_a1);
    h.ca.drop_tokens();
    let before = serial(&sub_b);
    next_cert(&mut sub_b, &before, Duration::from_secs(60)).await;
    assert_eq!(
        h.ca.calls()
            .iter()
            .rev()
            .find(|(_, c)| matches!(c, Call::Login(_)))
            .unwrap()
            .1,
        Call::Login(a.fingerprint()),
        "a still has a stream"
    );

    drop(sub_a2);
    h.ca.drop_tokens();
    let before = serial(&sub_b);
    next_cert(&mut sub_b, &before, Duration::from_secs(60)).await;
    assert_eq!(
        h.ca.calls()
            .iter()
            .rev()
            .find(|(_, c)| matches!(c, Call::Login(_)))
            .unwrap()
            .1,
        Call::Login(b.fingerprint()),
        "a's last stream ended"
    );
    assert_eq!(
        h.ca.count(|c| matches!(c, Call::Release(_))),
        0,
        "idle, not released"
    );
}

#[tokio::test(start_paused = true)]
async fn jwts_per_identity_are_bounded_and_the_displaced_one_released() {
    let h = harness(|o| o.max_jwts_per_identity = 2);
    let (a, b, c) = (
        jwt("x", Some(h.unix(1000))),
        jwt("x", Some(h.unix(2000))),
        jwt("x", Some(h.unix(3000))),
    );
    let _subs = [
        h.m.subscribe(&a).await.unwrap(),
        h.m.subscribe(&b).await.unwrap(),
        h.m.subscribe(&c).await.unwrap(),
    ];
    tokio::task::yield_now().await;
    assert_eq!(h.ca.count(|x| matches!(x, Call::Release(_))), 1);
    assert_eq!(
        h.ca.count(|x| *x == Call::Release(a.fingerprint())),
        1,
        "the one expiring first"
    );
}

#[tokio::test(start_paused = true)]
async fn a_sign_rejection_drops_the_token_logs_in_again_and_retries_once() {
    let h = harness(|_| {});
    let a = jwt("x", None);
    let mut sub = h.m.subscribe(&a).await.unwrap();
    // Vault was rebuilt: every token it gave is refused.
    h.ca.revoke_tokens();
    let since = h.ca.calls().len();
    let before = serial(&sub);
    next_cert(&mut sub, &before, Duration::from_secs(60)).await;
    assert!(sub.secret.borrow().closed.is_none());
    let calls = calls_since(&h.ca, since);
    let kinds: Vec<Call> = calls.iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(
        kinds,
        [
            Call::Sign(1),
            Call::Invalidate(1),
            Call::Login(a.fingerprint()),
            Call::Sign(2)
        ],
    );
    assert_eq!(
        calls[3].0, calls[0].0,
        "retried at once, not after a back-off"
    );

    // Every token refused, the new one too: one retry, then the failure is
    // reported and retried with back-off, never in a loop; the streams stay.
    let refused = CaError::Rejected(CaFailure::new("permission denied").token_refused());
    *h.ca.sign_error.lock().unwrap() = Some(refused);
    let since = h.ca.calls().len();
    tokio::time::sleep(Duration::from_secs(52)).await;
    let calls = calls_since(&h.ca, since);
    let kinds: Vec<&Call> = calls.iter().map(|(_, c)| c).take(5).collect();
    assert!(
        matches!(
            kinds.as_slice(),
            [
                Call::Sign(2),
                Call::Invalidate(2),
                Call::Login(_),
                Call::Sign(3),
                Call::Invalidate(3)
            ]
        ),
        "{kinds:?}"
    );
    let pause = calls[5].0 - calls[4].0;
    assert!(
        pause >= Duration::from_millis(500),
        "backed off {pause:?} before trying again"
    );
    assert!(sub.secret.borrow().closed.is_none());

    // A refusal a new token cannot fix (the role refuses the request) is
    // not retried with a new login: reported, then retried with back-off.
    *h.ca.sign_error.lock().unwrap() = Some(CaError::rejected("the role forbids this SAN"));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let since = h.ca.calls().len();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let calls = calls_since(&h.ca, since);
    assert!(calls.len() >= 2, "{calls:?}");
    assert!(
        calls.iter().all(|(_, c)| matches!(c, Call::Sign(_))),
        "no invalidation, no login: {calls:?}"
    );

    // A first fetch whose cached token was revoked heals the same way.
    *h.ca.sign_error.lock().unwrap() = None;
    let other = jwt("y", None);
    h.ca.login(&other).await.unwrap();
    h.ca.revoke_tokens();
    let since = h.ca.calls().len();
    assert!(h.m.subscribe(&other).await.is_ok());
    let calls: Vec<Call> = calls_since(&h.ca, since)
        .into_iter()
        .map(|(_, c)| c)
        .take(4)
        .collect();
    assert!(
        matches!(
            calls.as_slice(),
            [
                Call::Sign(_),
                Call::Invalidate(_),
                Call::Login(_),
                Call::Sign(_)
            ]
        ),
        "{calls:?}"
    );
}

/// The fake CA's calls after the first `since`, except listings of its roots.
fn calls_since(ca: &FakeCa, since: usize) -> Vec<(Instant, Call)> {
    ca.calls()
        .into_iter()
        .skip(since)
        .filter(|(_, c)| *c != Call::ListRoots)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn an_entry_forgotten_while_a_subscriber_logs_in_is_never_installed_into() {
    let h = harness(|_| {});
    // a's JWT expires before the renewal (at ~50 s): the identity will be
    // forgotten then, its streams ended.
    let a = jwt("x", Some(h.unix(40)));
    let old = h.m.subscribe(&a).await.unwrap();
    tokio::time::sleep(Duration::from_secs(45)).await;
    // b subscribes to the same identity; its login takes until ~55 s, so it
    // holds the old entry across the forget.
    *h.ca.login_latency.lock().unwrap() = Duration::from_secs(10);
    let m = h.m.clone();
    let b = jwt("x", None);
    let late = tokio::spawn(async move { m.subscribe(&b).await });
    tokio::time::sleep(Duration::from_secs(7)).await;
    let reason = old.secret.borrow().closed.clone();
    assert!(
        reason.is_some_and(|r| r.contains("has expired")),
        "the old streams were ended"
    );
    let new = late.await.unwrap().unwrap();
    assert!(
        new.secret.borrow().closed.is_none(),
        "the late subscriber is served"
    );
    assert!(new.secret.borrow().secret.is_some());
    // The forgotten entry got nothing after it was forgotten.
    assert!(old.secret.borrow().secret.is_none());
    assert_eq!(h.m.cached_identities(), 1);
    // And the fresh entry is rotated: a renewal ~50 s after its issue.
    let mut new = new;
    let before = serial(&new);
    next_cert(&mut new, &before, Duration::from_secs(60)).await;
    assert!(new.secret.borrow().closed.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_with_a_cached_login_takes_no_place_in_the_ca_queue() {
    let h = harness(|o| o.max_concurrency = 1);
    let a = jwt("a", None);
    let _first = h.m.subscribe(&a).await.unwrap();
    // Another identity's first fetch holds the only CA slot for 30 s.
    *h.ca.sign_latency.lock().unwrap() = Duration::from_secs(30);
    let m = h.m.clone();
    let busy = tokio::spawn(async move { m.subscribe(&jwt("busy", None)).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    let again = h.m.subscribe(&a).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "waited {:?}",
        t.elapsed()
    );
    assert!(again.secret.borrow().secret.is_some());
    busy.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_first_fetch_does_not_queue_behind_its_identitys_renewal() {
    // One CA slot. Three identities renew at ~50 s, `a` at ~60 s, behind
    // them in the renewal line; a long first fetch of another identity holds
    // the slot from 45 s to 115 s. When `a`'s certificate has expired (~110
    // s) a new stream of `a` arrives: its first fetch must go ahead of the
    // queued renewals, not wait for `a`'s own renewal at the back.
    let h = harness(|o| o.max_concurrency = 1);
    let mut subs = Vec::new();
    for sa in ["r1", "r2", "r3"] {
        subs.push(h.m.subscribe(&jwt(sa, None)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let a = jwt("a", None);
    subs.push(h.m.subscribe(&a).await.unwrap());
    tokio::time::sleep(Duration::from_secs(35)).await;
    *h.ca.sign_latency.lock().unwrap() = Duration::from_secs(70);
    let m = h.m.clone();
    let blocker = tokio::spawn(async move { m.subscribe(&jwt("blocker", None)).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    *h.ca.sign_latency.lock().unwrap() = Duration::from_secs(10);
    // Past the expiry of `a`'s certificate (issued at 10 s, 100 s).
    tokio::time::sleep(Duration::from_secs(64)).await;
    let t = Instant::now();
    let late = h.m.subscribe(&a).await.unwrap();
    let waited = t.elapsed();
    // The blocker ends at 115 s (~5 s), then this fetch signs (10 s); behind
    // the renewals it would wait for four more signs (40 s).
    assert!(waited <= Duration::from_secs(16), "waited {waited:?}");
    assert!(late.secret.borrow().secret.is_some());
    blocker.await.unwrap().unwrap();
}

//! When renewals happen, how failures back off, and when idle identities leave.

use super::*;

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

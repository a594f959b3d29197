//! What the cache's states and the CA queue rule out: a forgotten entry
//! installed into, a cached login queued, a first fetch behind a renewal.

use super::*;

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

#[tokio::test(start_paused = true)]
async fn ca_max_concurrency_bounds_reads_of_the_cas_roots_too() {
    let h = harness(|o| o.max_concurrency = 2);
    // The first read of the CA's roots, at start.
    tokio::time::sleep(Duration::from_millis(10)).await;
    *h.ca.sign_latency.lock().unwrap() = Duration::from_secs(5);
    *h.ca.list_latency.lock().unwrap() = Duration::from_secs(5);
    // A root not yet served signs: the first chain asks for a read of the
    // CA's roots while other signs are waiting.
    let new = h.ca.add_root(Duration::from_secs(10 * 365 * 86400));
    h.ca.set_listing(Ok(vec![0, new]));
    *h.ca.signing.lock().unwrap() = new;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let m = h.m.clone();
        tasks.push(tokio::spawn(async move {
            m.subscribe(&jwt(&format!("s{i}"), None)).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        h.ca.count(|c| *c == Call::ListRoots) >= 2,
        "the read was asked for"
    );
    assert_eq!(
        h.ca.peak_in_flight(),
        2,
        "the bound is reached and never passed"
    );
}

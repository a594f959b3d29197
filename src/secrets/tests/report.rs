//! What the manager reports of its identities (for `/debug/identities` and
//! the expiry gauges) and of the CA queue.

use super::*;

/// Lets the tasks that became ready run (the rotation task records its
/// schedule when it starts), without moving the paused clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn only(h: &Harness) -> crate::metrics::IdentityReport {
    let list = h.m.identities();
    assert_eq!(list.len(), 1, "{list:?}");
    list.into_iter().next().unwrap()
}

#[tokio::test(start_paused = true)]
async fn each_identity_with_its_certificate_schedule_streams_and_last_error() {
    let h = harness(|_| {});
    assert!(h.m.identities().is_empty());

    let mut sub = h.m.subscribe(&jwt("a", None)).await.unwrap();
    settle().await;
    let (serial_1, not_before, not_after, received) = {
        let s = sub.secret.borrow().secret.clone().unwrap();
        (
            s.leaf.serial_hex.clone(),
            s.leaf.not_before,
            s.leaf.not_after,
            s.received,
        )
    };
    let r = only(&h);
    assert_eq!(r.identity, "spiffe://td/ns/ns/sa/a");
    assert_eq!(r.key_type, "ec-p256");
    assert_eq!(r.serial.as_deref(), Some(serial_1.as_str()));
    assert_eq!(r.not_after, Some(not_after));
    // Half of the real lifetime (no jitter), as the schedule computes it.
    let start = not_before.max(received);
    let half = not_after - not_after.duration_since(start).unwrap().mul_f64(0.5);
    assert_eq!(r.renew_at, Some(half));
    assert_eq!(r.renewal_due, Some(half));
    assert_eq!(r.streams_open, 1);
    assert_eq!(r.last_error, None);

    // Another stream of the same identity, then gone again.
    let other = h.m.subscribe(&jwt("a", None)).await.unwrap();
    assert_eq!(only(&h).streams_open, 2);
    drop(other);
    assert_eq!(only(&h).streams_open, 1);

    // The renewal fails: the error is shown, and the retry time.
    *h.ca.sign_error.lock().unwrap() = Some(CaError::Unavailable("Vault is down".into()));
    tokio::time::sleep(h.clock.until(half) + Duration::from_millis(100)).await;
    let r = only(&h);
    let error = r.last_error.expect("the failed renewal");
    assert!(error.contains("Vault is down"), "{error}");
    assert_eq!(r.serial.as_deref(), Some(serial_1.as_str()), "still served");
    let retry = r.renew_at.unwrap();
    let now = h.clock.now();
    assert!(
        retry > now && retry <= now + Duration::from_secs(1),
        "the first back-off step (1 s): {retry:?}, now {now:?}"
    );
    assert_eq!(r.renewal_due, Some(half), "a failure does not move it");

    // The CA answers again: the renewed certificate, no error, a new schedule.
    *h.ca.sign_error.lock().unwrap() = None;
    next_cert(&mut sub, &serial_1, Duration::from_secs(5)).await;
    settle().await;
    let r = only(&h);
    assert_ne!(r.serial.as_deref(), Some(serial_1.as_str()));
    assert_eq!(r.last_error, None, "cleared by the renewal");
    assert!(r.not_after.unwrap() > not_after);
    assert!(
        r.renew_at.unwrap() > half + Duration::from_secs(40),
        "{r:?}"
    );
    assert_eq!(r.renewal_due, r.renew_at, "the new certificate's");
}

#[tokio::test(start_paused = true)]
async fn the_queue_depth_counts_requests_waiting_for_a_slot() {
    let h = harness(|o| o.max_concurrency = 1);
    *h.ca.sign_latency.lock().unwrap() = Duration::from_secs(10);
    assert_eq!(h.m.ca_queue_depth(), 0);
    let mut tasks = Vec::new();
    for sa in ["a", "b", "c"] {
        let m = h.m.clone();
        tasks.push(tokio::spawn(async move {
            m.subscribe(&jwt(sa, None)).await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.m.ca_queue_depth(), 2, "one signs, two wait");
    // Identities waiting for their first certificate have none to show.
    let list = h.m.identities();
    assert_eq!(list.len(), 3);
    assert!(list
        .iter()
        .all(|r| r.serial.is_none() && r.renew_at.is_none() && r.renewal_due.is_none()));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(h.m.ca_queue_depth(), 0);
}

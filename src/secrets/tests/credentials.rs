//! The JWTs renewals use, and what a refused sign does.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_renewal_uses_another_live_jwt_when_the_ca_rejects_one() {
    let h = harness(|_| {});
    let (a, b) = (
        jwt("x", Some(h.unix(10_000))),
        jwt("x", Some(h.unix(20_000))),
    );
    let mut sub_a = h.m.subscribe(&a).await.unwrap();
    let sub_b = h.m.subscribe(&b).await.unwrap();
    assert!(!sub_b.credential_rejected());
    // b's pod is deleted: its token is gone and Vault now refuses its JWT.
    h.ca.drop_tokens();
    h.ca.reject(&b);
    let before = serial(&sub_a);
    next_cert(&mut sub_a, &before, Duration::from_secs(60)).await;
    assert!(sub_a.secret.borrow().closed.is_none(), "renewed, not ended");
    // b's stream learns that its JWT no longer proves the identity; a's not.
    assert!(sub_b.credential_rejected(), "b was rejected");
    assert!(!sub_a.credential_rejected(), "a still proves it");
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

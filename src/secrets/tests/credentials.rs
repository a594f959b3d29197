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

    // Next renewal: b was forgotten; a, though its login is cached, is
    // proven again, once.
    let before = serial(&sub_a);
    let since = h.ca.calls().len();
    next_cert(&mut sub_a, &before, Duration::from_secs(60)).await;
    let logins: Vec<Call> = calls_since(&h.ca, since)
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| matches!(c, Call::Login(_)))
        .collect();
    assert_eq!(logins, [Call::Login(a.fingerprint())]);
}

#[tokio::test(start_paused = true)]
async fn every_live_jwt_is_proven_again_at_each_renewal_and_a_rejected_one_never_gets_its_certificate(
) {
    let h = harness(|_| {});
    let (a, b) = (
        jwt("x", Some(h.unix(20_000))),
        jwt("x", Some(h.unix(10_000))),
    );
    let mut sub_a = h.m.subscribe(&a).await.unwrap();
    let mut sub_b = h.m.subscribe(&b).await.unwrap();
    let first = serial(&sub_a);
    // Renewals while both are accepted: one login per JWT per renewal,
    // their cached logins notwithstanding.
    for _ in 0..2 {
        let since = h.ca.calls().len();
        let before = serial(&sub_a);
        next_cert(&mut sub_a, &before, Duration::from_secs(60)).await;
        let logins: Vec<Call> = calls_since(&h.ca, since)
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| matches!(c, Call::Login(_)))
            .collect();
        assert_eq!(
            logins,
            [Call::Login(a.fingerprint()), Call::Login(b.fingerprint())]
        );
        assert_eq!(sub_b.standing(), Standing::Proven);
        sub_b.secret.borrow_and_update();
    }
    assert_ne!(serial(&sub_a), first);
    // b's pod is deleted: b is refused at the next renewal, though a token
    // of it is cached, and its stream learns so before the certificate
    // issued after the refusal is installed.
    h.ca.reject(&b);
    sub_b.secret.changed().await.unwrap();
    assert_eq!(sub_b.standing(), Standing::Rejected);
    assert_eq!(sub_a.standing(), Standing::Proven);
    // A new stream with b is refused too.
    assert!(matches!(
        h.m.subscribe(&b).await,
        Err(SecretError::Login(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_stream_whose_jwt_was_not_remembered_is_unproven_after_a_renewal() {
    let h = harness(|o| o.max_jwts_per_identity = 1);
    let (a, b) = (
        jwt("x", Some(h.unix(20_000))),
        jwt("x", Some(h.unix(10_000))),
    );
    let mut sub_a = h.m.subscribe(&a).await.unwrap();
    // b expires before a, which fills the identity's JWTs: not remembered.
    let sub_b = h.m.subscribe(&b).await.unwrap();
    assert_eq!(
        sub_b.standing(),
        Standing::Proven,
        "proven by its subscribe"
    );
    let before = serial(&sub_a);
    next_cert(&mut sub_a, &before, Duration::from_secs(60)).await;
    assert_eq!(sub_a.standing(), Standing::Proven);
    assert_eq!(
        sub_b.standing(),
        Standing::Unproven,
        "not proven at the renewal"
    );
    // Subscribing again proves it for the certificate now served.
    let again = h.m.subscribe(&b).await.unwrap();
    assert_eq!(again.standing(), Standing::Proven);
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
    let renewal_logins = |since: usize| -> Vec<Call> {
        calls_since(&h.ca, since)
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| matches!(c, Call::Login(_)))
            .collect()
    };
    drop(sub_a1);
    let since = h.ca.calls().len();
    let before = serial(&sub_b);
    next_cert(&mut sub_b, &before, Duration::from_secs(60)).await;
    assert_eq!(
        renewal_logins(since),
        [Call::Login(a.fingerprint()), Call::Login(b.fingerprint())],
        "a still has a stream"
    );
    assert_eq!(h.ca.count(|c| matches!(c, Call::Release(_))), 0);

    drop(sub_a2);
    let since = h.ca.calls().len();
    let before = serial(&sub_b);
    next_cert(&mut sub_b, &before, Duration::from_secs(60)).await;
    assert_eq!(
        renewal_logins(since),
        [Call::Login(b.fingerprint())],
        "a's last stream ended"
    );
    tokio::task::yield_now().await;
    assert_eq!(
        h.ca.count(|c| *c == Call::Release(a.fingerprint())),
        1,
        "the idle JWT's login is released at the renewal"
    );
    // Still remembered: a reconnect with it logs in anew and is served.
    let since = h.ca.calls().len();
    let back = h.m.subscribe(&a).await.unwrap();
    assert_eq!(renewal_logins(since), [Call::Login(a.fingerprint())]);
    assert_eq!(back.standing(), Standing::Proven);
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
    // The token the renewal's login gets is refused at its sign (Vault
    // revoked it meanwhile).
    *h.ca.next_sign_error.lock().unwrap() = Some(CaError::Rejected(
        CaFailure::new("permission denied").token_refused(),
    ));
    let since = h.ca.calls().len();
    let before = serial(&sub);
    next_cert(&mut sub, &before, Duration::from_secs(60)).await;
    assert!(sub.secret.borrow().closed.is_none());
    let calls = calls_since(&h.ca, since);
    let kinds: Vec<Call> = calls.iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(
        kinds,
        [
            Call::Login(a.fingerprint()),
            Call::Sign(2),
            Call::Invalidate(2),
            Call::Login(a.fingerprint()),
            Call::Sign(3)
        ],
    );
    assert_eq!(
        calls[4].0, calls[1].0,
        "retried at once, not after a back-off"
    );

    // Every token refused, the new one too: one retry, then the failure is
    // reported and retried with back-off, never in a loop; the streams stay.
    let refused = CaError::Rejected(CaFailure::new("permission denied").token_refused());
    *h.ca.sign_error.lock().unwrap() = Some(refused);
    let since = h.ca.calls().len();
    tokio::time::sleep(Duration::from_secs(52)).await;
    let calls = calls_since(&h.ca, since);
    let kinds: Vec<&Call> = calls.iter().map(|(_, c)| c).take(6).collect();
    assert!(
        matches!(
            kinds.as_slice(),
            [
                Call::Login(_),
                Call::Sign(4),
                Call::Invalidate(4),
                Call::Login(_),
                Call::Sign(5),
                Call::Invalidate(5)
            ]
        ),
        "{kinds:?}"
    );
    let pause = calls[6].0 - calls[5].0;
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

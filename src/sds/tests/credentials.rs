//! A request is served no longer than its JWT holds: an expired JWT is
//! refused before any cache lookup, even when its identity is cached; a
//! stream ends with `UNAUTHENTICATED` at its JWT's `exp` (and not before),
//! and with `PERMISSION_DENIED` when the CA rejects that JWT at a renewal,
//! without receiving the certificate other streams' JWTs renewed.

use super::*;

#[tokio::test(start_paused = true)]
async fn an_expired_jwt_is_refused_even_when_its_identity_is_cached() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    fetch(&mut client, &["default"], &jwt("x", None))
        .await
        .expect("the identity is served and cached");
    let expired = jwt("x", Some(1000));
    let err = fetch(&mut client, &["default"], &expired)
        .await
        .unwrap_err();
    assert!(is(&err, Code::Unauthenticated, "expired"), "{err:?}");
    let mut s = open_sotw(&mut client, &expired).await.unwrap();
    s.send(request(&["ROOTCA"], None)).await;
    let err = s.status().await;
    assert!(is(&err, Code::Unauthenticated, "expired"), "{err:?}");
    assert_eq!(
        agent.log().matches("issued workload certificate").count(),
        1
    );
    assert_eq!(agent.ca.signs(), 1);
}

#[tokio::test(start_paused = true)]
async fn streams_end_unauthenticated_at_their_jwt_exp_and_not_before() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let exp = agent.unix_in(300);
    let short = jwt("x", Some(exp));
    let mut sotw = open_sotw(&mut client, &short).await.unwrap();
    let mut delta = open_delta(&mut client, &short).await.unwrap();
    sotw.send(request(&["default"], None)).await;
    let first = sotw.response().await;
    delta.send(delta_request(&["default"], "")).await;
    delta.response().await;
    sotw.send(request(&["default"], Some(&first))).await;

    // Negative control: a few seconds before exp both are still open.
    let before = Duration::from_secs(10);
    tokio::time::advance(Duration::from_secs(300) - before).await;
    sotw.silent(Duration::from_secs(3), "StreamSecrets before exp")
        .await;
    delta
        .silent(Duration::from_secs(3), "DeltaSecrets before exp")
        .await;
    assert!(agent.clock.unix_now() < exp);

    // Waiting (paused time jumps to the next timer), both end at exp.
    for status in [sotw.status().await, delta.status().await] {
        assert!(
            is(&status, Code::Unauthenticated, &format!("expired at {exp}")),
            "{status:?}"
        );
    }
    let now = agent.clock.unix_now();
    assert!(now >= exp - 1 && now <= exp, "ended at {now}, exp {exp}");
}

#[tokio::test(start_paused = true)]
async fn a_jwt_the_ca_rejects_at_a_renewal_ends_its_streams_without_the_new_certificate() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    // `bad` expires last, so a renewal tries it first.
    let good = jwt("x", Some(agent.unix_in(20_000)));
    let bad = jwt("x", Some(agent.unix_in(30_000)));
    let mut served = open_sotw(&mut client, &good).await.unwrap();
    let mut refused = open_sotw(&mut client, &bad).await.unwrap();
    let mut refused_delta = open_delta(&mut client, &bad).await.unwrap();
    served.send(request(&["default"], None)).await;
    let first = served.response().await;
    refused.send(request(&["default"], None)).await;
    assert_eq!(serial(&refused.response().await), serial(&first));
    refused_delta.send(delta_request(&["default"], "")).await;
    assert_eq!(
        delta_serial(&refused_delta.response().await),
        serial(&first)
    );
    served.send(request(&["default"], Some(&first))).await;

    // bad's pod is deleted: its login is gone and the CA refuses its JWT.
    agent.ca.drop_tokens();
    agent.ca.reject(&bad);
    tokio::time::advance(RENEWAL).await;
    let renewed = served.response().await;
    assert_ne!(serial(&renewed), serial(&first));
    assert_eq!(
        agent.ca.count(|c| *c == Call::Login(bad.fingerprint())),
        2,
        "bad was tried at the renewal"
    );
    // The next thing on bad's streams is the end, not the new certificate.
    for status in [refused.status().await, refused_delta.status().await] {
        assert!(
            is(&status, Code::PermissionDenied, "no longer accepts the JWT"),
            "{status:?}"
        );
    }
    // good's stream goes on.
    served.silent(QUIET, "the served stream").await;
}

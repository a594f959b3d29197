//! A stream that proves nothing holds no place: its first request must carry
//! a credential whatever it says (a nonce the stream never sent, an ACK, no
//! names, only names the agent does not serve), or the stream ends
//! `UNAUTHENTICATED` at once instead of staying open.

use super::*;

const NO_CREDENTIAL: &str = "istio_sds_credentials_header-bin";

/// A first request carrying a nonce, as an ACK of a response never sent.
fn with_nonce(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        response_nonce: "7".into(),
        version_info: "v1".into(),
        ..request(names, None)
    }
}

#[tokio::test(start_paused = true)]
async fn sotw_a_first_request_with_a_nonce_and_no_credential_ends_the_stream() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    for first in [
        with_nonce(&["default"]),
        with_nonce(&[]),
        request(&[], None),
    ] {
        let mut s = open_sotw_with(&mut client, None).await.unwrap();
        s.send(first.clone()).await;
        let status = s.status().await;
        assert!(
            is(&status, Code::Unauthenticated, NO_CREDENTIAL),
            "{first:?}: {status:?}"
        );
    }
    // The same first request with a JWT keeps the stream open (the nonce
    // is stale, so nothing is sent), and its next request is served.
    let mut s = open_sotw(&mut client, &jwt("x", None)).await.unwrap();
    s.send(with_nonce(&["default"])).await;
    s.silent(Duration::from_secs(5), "a stale nonce").await;
    s.send(request(&["default"], None)).await;
    assert_eq!(names(&s.response().await), ["default"]);
    assert_eq!(agent.ca.signs(), 1);
}

#[tokio::test(start_paused = true)]
async fn delta_an_empty_or_unknown_first_request_without_a_credential_ends_the_stream() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    for first in [
        delta_request(&[], ""),
        delta_request(&[], "3"),
        delta_request(&["bogus"], ""),
    ] {
        let mut d = open_delta_with(&mut client, None).await.unwrap();
        d.send(first.clone()).await;
        let status = d.status().await;
        assert!(
            is(&status, Code::Unauthenticated, NO_CREDENTIAL),
            "{first:?}: {status:?}"
        );
    }
    // With a JWT, an empty first request keeps the stream open, and a
    // later subscription is served.
    let mut d = open_delta(&mut client, &jwt("x", None)).await.unwrap();
    d.send(delta_request(&[], "")).await;
    d.silent(Duration::from_secs(5), "an empty subscription")
        .await;
    d.send(delta_request(&["default"], "")).await;
    assert_eq!(delta_names(&d.response().await), ["default"]);
    assert_eq!(agent.ca.signs(), 1);
}

//! ACKs, NACKs and stale nonces, over the socket: what is answered, what is
//! not, and what a NACK changes (nothing until the next change).

use super::*;

#[tokio::test(start_paused = true)]
async fn sotw_an_ack_is_not_answered_and_a_new_subscription_is() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let mut s = open_sotw(&mut client, &jwt("x", None)).await.unwrap();
    s.send(request(&["default"], None)).await;
    let first = s.response().await;
    assert_eq!(names(&first), ["default"]);

    s.send(request(&["default"], Some(&first))).await;
    s.silent(QUIET, "an ACK").await;

    // Positive control: the same nonce naming another set of resources is
    // answered, at once.
    s.send(request(&["default", "ROOTCA"], Some(&first))).await;
    let second = s.response().await;
    assert_eq!(names(&second), ["default", "ROOTCA"]);
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(serial(&second), serial(&first), "the same certificate");
}

#[tokio::test(start_paused = true)]
async fn sotw_a_nacked_secret_is_not_sent_again_and_the_next_change_is() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let mut s = open_sotw(&mut client, &jwt("x", None)).await.unwrap();
    s.send(request(&["default", "ROOTCA"], None)).await;
    let first = s.response().await;

    let mut nack = request(&["default", "ROOTCA"], Some(&first));
    nack.error_detail = nack_detail();
    s.send(nack).await;
    s.silent(QUIET, "a NACK").await;

    tokio::time::advance(RENEWAL).await;
    let renewed = s.response().await;
    assert_ne!(serial(&renewed), serial(&first), "the renewed certificate");
    assert_ne!(
        renewed.version_info, first.version_info,
        "the NACKed version was sent again"
    );
    assert_ne!(
        chain_and_key(&secret_named(&renewed, "default")),
        chain_and_key(&secret_named(&first, "default")),
        "the renewed certificate and key"
    );
    assert!(agent.log().contains("renewed workload certificate"));
}

#[tokio::test(start_paused = true)]
async fn sotw_a_request_with_a_stale_nonce_is_ignored() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let mut s = open_sotw(&mut client, &jwt("x", None)).await.unwrap();
    s.send(request(&["default"], None)).await;
    let first = s.response().await;

    // A new set of names, but echoing a nonce that is not the last one sent.
    let mut stale = request(&["default", "ROOTCA"], Some(&first));
    stale.response_nonce = format!("{}-old", first.nonce);
    s.send(stale).await;
    s.silent(QUIET, "a stale nonce").await;

    // Positive control: the same request with the last nonce is answered.
    s.send(request(&["default", "ROOTCA"], Some(&first))).await;
    assert_eq!(names(&s.response().await), ["default", "ROOTCA"]);
}

#[tokio::test(start_paused = true)]
async fn delta_an_ack_is_not_answered_and_a_subscribe_riding_on_one_is() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let mut s = open_delta(&mut client, &jwt("x", None)).await.unwrap();
    s.send(delta_request(&["default"], "")).await;
    let first = s.response().await;
    assert_eq!(delta_names(&first), ["default"]);

    s.send(delta_request(&[], &first.nonce)).await;
    s.silent(QUIET, "an ACK").await;

    // Positive control: an ACK subscribing to another name is answered with
    // that name alone.
    s.send(delta_request(&["ROOTCA"], &first.nonce)).await;
    let second = s.response().await;
    assert_eq!(delta_names(&second), ["ROOTCA"]);
    assert_ne!(second.nonce, first.nonce);
}

#[tokio::test(start_paused = true)]
async fn delta_a_nacked_version_is_not_sent_again_and_the_next_change_is() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let mut s = open_delta(&mut client, &jwt("x", None)).await.unwrap();
    s.send(delta_request(&["default"], "")).await;
    let first = s.response().await;

    let mut nack = delta_request(&[], &first.nonce);
    nack.error_detail = nack_detail();
    s.send(nack).await;
    s.silent(QUIET, "a NACK").await;

    tokio::time::advance(RENEWAL).await;
    let renewed = s.response().await;
    assert_eq!(delta_names(&renewed), ["default"]);
    assert_ne!(delta_serial(&renewed), delta_serial(&first));
    assert_ne!(renewed.resources[0].version, first.resources[0].version);
}

#[tokio::test(start_paused = true)]
async fn delta_a_nonce_the_stream_never_sent_is_ignored() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let mut s = open_delta(&mut client, &jwt("x", None)).await.unwrap();
    s.send(delta_request(&["default"], "")).await;
    let first = s.response().await;

    // A previous agent's nonce, NACKed: neither an error nor answered.
    let mut stale = delta_request(&[], "0000-1-1");
    stale.error_detail = nack_detail();
    s.send(stale).await;
    s.silent(QUIET, "a stale nonce").await;

    // The stream still serves: an ACK of the real nonce is silent too, and
    // the next change is pushed.
    s.send(delta_request(&[], &first.nonce)).await;
    s.silent(QUIET, "an ACK").await;
    tokio::time::advance(RENEWAL).await;
    let renewed = s.response().await;
    assert_ne!(delta_serial(&renewed), delta_serial(&first));
}

/// Requests on a stream are read in order, so a request that must get no
/// reply is followed by one that must: the next response answering the
/// second proves the first was read and left unanswered.
#[tokio::test(start_paused = true)]
async fn sotw_acks_nacks_and_stale_nonces_in_turn_on_one_stream() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let mut s = open_sotw(&mut client, &x).await.unwrap();
    s.send(request(&["default"], None)).await;
    let first = s.response().await;
    assert_eq!(names(&first), ["default"]);
    let default = secret_named(&first, "default");
    assert_eq!(uris(&default), ["spiffe://td/ns/ns/sa/x"]);
    let (chain, key) = chain_and_key(&default);

    // An ACK with the name repeated (names are a set): no reply. Then a
    // changed subscription, which is answered.
    s.send(request(&["default", "default"], Some(&first))).await;
    s.send(request(&["default", "ROOTCA"], Some(&first))).await;
    let second = s.response().await;
    assert_eq!(
        names(&second),
        ["default", "ROOTCA"],
        "the ACK was not answered: the next response is the change's"
    );
    assert_ne!(second.nonce, first.nonce);

    // A NACK, the same names in another order: logged, not answered with
    // the same secret. Then a changed subscription, which is answered.
    let mut nack = request(&["ROOTCA", "default"], Some(&second));
    nack.error_detail = nack_detail();
    s.send(nack).await;
    s.send(request(&["ROOTCA"], Some(&second))).await;
    let third = s.response().await;
    assert_eq!(
        names(&third),
        ["ROOTCA"],
        "the NACK was not answered: the next response is the change's"
    );
    assert!(
        agent
            .log()
            .contains("Envoy rejected the SDS response (NACK): Failed to load certificate chain from <inline>"),
        "{}",
        agent.log()
    );

    // A nonce sent before the last one is stale: ignored, even when it asks
    // for something else.
    s.send(request(&["default", "ROOTCA"], Some(&second))).await;
    s.send(request(&["default"], Some(&third))).await;
    let fourth = s.response().await;
    assert_eq!(
        names(&fourth),
        ["default"],
        "the stale request was ignored: the next response is the current one's"
    );

    // A NACK that also changes the names is a new subscription: answered,
    // with the same certificate and key.
    let mut nack = request(&["default", "ROOTCA"], Some(&fourth));
    nack.error_detail = nack_detail();
    s.send(nack).await;
    let fifth = s.response().await;
    assert_eq!(names(&fifth), ["default", "ROOTCA"]);
    assert_eq!(
        chain_and_key(&secret_named(&fifth, "default")),
        (chain.clone(), key.clone()),
        "no new key for a repeated request"
    );

    // Another connection's request for the same identity shares the
    // certificate and key.
    let mut other = agent.client().await;
    let resp = fetch(&mut other, &["default"], &x).await.unwrap();
    assert_eq!(chain_and_key(&secret_named(&resp, "default")), (chain, key));
}

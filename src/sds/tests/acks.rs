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
    s.send(request(&["default"], None)).await;
    let first = s.response().await;

    let mut nack = request(&["default"], Some(&first));
    nack.error_detail = nack_detail();
    s.send(nack).await;
    s.silent(QUIET, "a NACK").await;

    tokio::time::advance(RENEWAL).await;
    let renewed = s.response().await;
    assert_ne!(serial(&renewed), serial(&first), "the renewed certificate");
    assert_ne!(renewed.version_info, first.version_info);
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

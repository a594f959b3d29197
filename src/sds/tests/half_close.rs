//! Half-closed streams: a client that sends its request and half-closes (as
//! grpcurl or a one-shot fetcher does) is answered before the stream ends,
//! since a half-close says "no more requests", not "cancel"; and a client
//! that half-closes and leaves while its first fetch waits on the CA takes
//! its stream, and the fetch, with it.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_half_closed_stream_is_answered_then_ended() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let mut s = open_sotw(&mut client, &jwt("half-closed", None))
        .await
        .unwrap();
    s.send(request(&["default"], None)).await;
    s.half_close();
    let first = s.response().await;
    assert_eq!(served_uris(&first), ["spiffe://td/ns/ns/sa/half-closed"]);
    s.ends_ok().await;
}

/// A client that half-closes and then resets its stream while its first
/// fetch waits on a CA that does not answer: the stream's task ends,
/// dropping the fetch, and its place is given back.
async fn leaving_while_the_fetch_waits(delta: bool) {
    let agent = Agent::start(|_| {}).await;
    *agent.ca.login_latency.lock().unwrap() = NEVER;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let logins = || agent.ca.count(|c| matches!(c, Call::Login(_)));
    if delta {
        let mut d = open_delta(&mut client, &x).await.unwrap();
        d.send(delta_request(&["default"], "")).await;
        eventually("the fetch reaches the CA", QUIET, || logins() == 1).await;
        d.half_close();
        d.silent(QUIET, "a half-closed stream waiting for its fetch")
            .await;
        assert_eq!(agent.ca.in_flight(), 1, "the fetch still waits");
        drop(d);
    } else {
        let mut s = open_sotw(&mut client, &x).await.unwrap();
        s.send(request(&["default"], None)).await;
        eventually("the fetch reaches the CA", QUIET, || logins() == 1).await;
        s.half_close();
        s.silent(QUIET, "a half-closed stream waiting for its fetch")
            .await;
        assert_eq!(agent.ca.in_flight(), 1, "the fetch still waits");
        drop(s);
    }
    eventually("the stream's place is given back", QUIET, || {
        agent.limits.open_streams() == 0
    })
    .await;
    // The fetch lives in the stream's task: it is dropped when the task ends.
    eventually("the stream's task ends, dropping its fetch", QUIET, || {
        agent.ca.in_flight() == 0
    })
    .await;
    assert_eq!(logins(), 1, "the fetch was not retried");
}

#[tokio::test(start_paused = true)]
async fn sotw_a_client_leaving_while_its_first_fetch_waits_ends_the_stream() {
    leaving_while_the_fetch_waits(false).await;
}

#[tokio::test(start_paused = true)]
async fn delta_a_client_leaving_while_its_first_fetch_waits_ends_the_stream() {
    leaving_while_the_fetch_waits(true).await;
}

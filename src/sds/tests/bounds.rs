//! The bounds, over the socket: the stream caps and the request bounds are
//! refused with a status naming the setting, and a client that leaves while
//! its first fetch waits on the CA takes its stream with it.

use super::*;

#[tokio::test(start_paused = true)]
async fn streams_past_the_caps_are_refused_naming_the_setting() {
    let agent = Agent::start(|l| {
        l.connection_max_streams = 2;
        l.max_streams = 3;
    })
    .await;
    let x = jwt("x", None);
    let mut a = agent.client().await;
    let a1 = open_sotw(&mut a, &x).await.unwrap();
    let _a2 = open_delta(&mut a, &x).await.unwrap();
    for refused in [
        open_sotw(&mut a, &x).await.err(),
        open_delta(&mut a, &x).await.err(),
    ] {
        let status = refused.expect("a third stream on the connection is refused");
        assert!(
            is(
                &status,
                Code::ResourceExhausted,
                "SDS_CONNECTION_MAX_STREAMS=2"
            ),
            "{status:?}"
        );
    }
    // Another connection has its own two, within the agent's three.
    let mut b = agent.client().await;
    let _b1 = open_sotw(&mut b, &x).await.unwrap();
    assert_eq!(agent.limits.open_streams(), 3);
    for refused in [
        open_sotw(&mut b, &x).await.err(),
        open_delta(&mut b, &x).await.err(),
    ] {
        let status = refused.expect("a fourth stream on the agent is refused");
        assert!(
            is(&status, Code::ResourceExhausted, "SDS_MAX_STREAMS=3"),
            "{status:?}"
        );
    }
    // A stream that ends gives its place back.
    drop(a1);
    eventually("a's stream is given back", QUIET, || {
        agent.limits.open_streams() == 2
    })
    .await;
    let mut b2 = open_delta(&mut b, &x).await.unwrap();
    b2.send(delta_request(&["default"], "")).await;
    assert_eq!(delta_names(&b2.response().await), ["default"]);
}

#[tokio::test(start_paused = true)]
async fn requests_naming_too_many_resources_are_refused_naming_the_setting() {
    let agent = Agent::start(|l| l.max_resource_names = 2).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let three = ["default", "ROOTCA", "other"];

    let mut s = open_sotw(&mut client, &x).await.unwrap();
    s.send(request(&three, None)).await;
    let status = s.status().await;
    assert!(
        is(&status, Code::InvalidArgument, "SDS_MAX_RESOURCE_NAMES"),
        "{status:?}"
    );
    let mut d = open_delta(&mut client, &x).await.unwrap();
    d.send(delta_request(&three, "")).await;
    let status = d.status().await;
    assert!(
        is(&status, Code::InvalidArgument, "SDS_MAX_RESOURCE_NAMES"),
        "{status:?}"
    );
    let mut d = open_delta(&mut client, &x).await.unwrap();
    d.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: three.iter().map(|n| n.to_string()).collect(),
        ..delta_request(&[], "")
    })
    .await;
    let status = d.status().await;
    assert!(
        is(&status, Code::InvalidArgument, "SDS_MAX_RESOURCE_NAMES"),
        "{status:?}"
    );

    // Positive control: as many as the bound, repeats aside, are served.
    let mut s = open_sotw(&mut client, &x).await.unwrap();
    s.send(request(&["default", "ROOTCA", "default"], None))
        .await;
    assert_eq!(names(&s.response().await), ["default", "ROOTCA"]);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_sends_nothing_ends_at_the_first_request_timeout() {
    let timeout = Duration::from_secs(30);
    let agent = Agent::start(|l| l.first_request_timeout = timeout).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let start = tokio::time::Instant::now();
    let mut sotw = open_sotw(&mut client, &x).await.unwrap();
    let mut delta = open_delta(&mut client, &x).await.unwrap();
    // A stream whose request came in time is not concerned.
    let mut served = open_sotw(&mut client, &x).await.unwrap();
    served.send(request(&["default"], None)).await;
    served.response().await;

    // Negative control: open until a second before the timeout.
    tokio::time::advance(timeout - Duration::from_secs(3)).await;
    sotw.silent(Duration::from_secs(1), "StreamSecrets before the timeout")
        .await;
    delta
        .silent(Duration::from_secs(1), "DeltaSecrets before the timeout")
        .await;

    // Waiting (paused time jumps to the next timer), both end at the timeout.
    for status in [sotw.status().await, delta.status().await] {
        assert!(
            is(
                &status,
                Code::DeadlineExceeded,
                "SDS_FIRST_REQUEST_TIMEOUT=30s"
            ),
            "{status:?}"
        );
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_millis(100),
        "ended {elapsed:?} after opening"
    );
    served.silent(QUIET, "the served stream").await;
    assert_eq!(agent.limits.open_streams(), 1);
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

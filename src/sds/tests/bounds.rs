//! The bounds, over the socket: past the stream caps, the request bounds and
//! a connection's budget of new JWTs, requests are refused with a status
//! naming the setting; within them they are served.

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
    let mut a1 = open_sotw(&mut a, &x).await.unwrap();
    let mut a2 = open_delta(&mut a, &x).await.unwrap();
    // The streams within the caps are served.
    a1.send(request(&["default"], None)).await;
    assert_eq!(names(&a1.response().await), ["default"]);
    a2.send(delta_request(&["default"], "")).await;
    assert_eq!(delta_names(&a2.response().await), ["default"]);
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
    let mut b1 = open_delta(&mut b, &x).await.unwrap();
    b1.send(delta_request(&["default"], "")).await;
    assert_eq!(delta_names(&b1.response().await), ["default"]);
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
    let too_many = |status: &Status| {
        is(
            status,
            Code::InvalidArgument,
            "more than 2 distinct resources (SDS_MAX_RESOURCE_NAMES)",
        )
    };

    let mut s = open_sotw(&mut client, &x).await.unwrap();
    s.send(request(&three, None)).await;
    let status = s.status().await;
    assert!(too_many(&status), "{status:?}");
    let mut d = open_delta(&mut client, &x).await.unwrap();
    d.send(delta_request(&three, "")).await;
    let status = d.status().await;
    assert!(too_many(&status), "{status:?}");
    let mut d = open_delta(&mut client, &x).await.unwrap();
    d.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: three.iter().map(|n| n.to_string()).collect(),
        ..delta_request(&["default"], "")
    })
    .await;
    let status = d.status().await;
    assert!(too_many(&status), "{status:?}");

    // Positive control: as many as the bound, repeats aside, are served.
    let mut s = open_sotw(&mut client, &x).await.unwrap();
    s.send(request(&["default", "ROOTCA", "default"], None))
        .await;
    assert_eq!(names(&s.response().await), ["default", "ROOTCA"]);
    // On a delta stream, the served name is served and the unknown one
    // answered as removed, in two responses.
    let mut d = open_delta(&mut client, &x).await.unwrap();
    d.send(delta_request(&["default", "x1", "default"], ""))
        .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let resp = d.response().await;
        got.extend(delta_names(&resp));
        got.extend(resp.removed_resources);
    }
    got.sort();
    assert_eq!(got, ["default", "x1"]);
}

/// The default bound, 8 distinct names: repeats collapse, on a request
/// naming one name 5000 times too; a ninth distinct name is refused.
#[tokio::test(start_paused = true)]
async fn duplicate_names_collapse_and_a_ninth_distinct_one_is_refused() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let resp = fetch(&mut client, &vec!["default"; 5000], &x)
        .await
        .unwrap();
    assert_eq!(names(&resp), ["default"], "one resource, not 5000");
    let mut dup = vec!["ROOTCA"; 10];
    dup.extend(["default"; 10]);
    let resp = fetch(&mut client, &dup, &x).await.unwrap();
    assert_eq!(names(&resp), ["ROOTCA", "default"]);

    let distinct: Vec<String> = (0..9).map(|i| format!("name{i}")).collect();
    let distinct: Vec<&str> = distinct.iter().map(String::as_str).collect();
    let err = fetch(&mut client, &distinct, &x).await.unwrap_err();
    assert!(
        is(
            &err,
            Code::InvalidArgument,
            "more than 8 distinct resources (SDS_MAX_RESOURCE_NAMES)"
        ),
        "{err:?}"
    );
    let mut s = open_sotw(&mut client, &x).await.unwrap();
    s.send(request(&distinct, None)).await;
    assert_eq!(s.status().await.code(), Code::InvalidArgument);
}

#[tokio::test(start_paused = true)]
async fn a_request_over_the_request_bytes_is_refused_naming_the_setting() {
    let agent = Agent::start(|l| l.max_request_bytes = 16 << 10).await;
    let mut client = agent.client().await;
    let mut d = open_delta(&mut client, &jwt("x", None)).await.unwrap();
    // Positive control: a 12 KiB request is read (its unknown name answered
    // as removed).
    let small = "s".repeat(12 << 10);
    d.send(delta_request(&[&small], "")).await;
    assert_eq!(d.response().await.removed_resources, [small]);
    let big = "b".repeat(20 << 10);
    d.send(delta_request(&[&big], "")).await;
    let status = d.status().await;
    assert!(
        is(
            &status,
            Code::ResourceExhausted,
            "more than SDS_MAX_REQUEST_BYTES=16384"
        ),
        "{status:?}"
    );
}

/// A connection presenting more new JWTs than its burst, with no refill in
/// sight, has the one past the burst refused before it reaches the CA.
#[tokio::test(start_paused = true)]
async fn new_jwts_past_the_connection_burst_are_refused_naming_the_setting() {
    let agent = Agent::start(|l| {
        l.connection_new_jwt_burst = 2;
        l.connection_new_jwt_interval = NEVER;
    })
    .await;
    let mut client = agent.client().await;
    let mut held = Vec::new();
    for sa in ["a", "b"] {
        let mut d = open_delta(&mut client, &jwt(sa, None)).await.unwrap();
        d.send(delta_request(&["default"], "")).await;
        assert_eq!(delta_names(&d.response().await), ["default"]);
        held.push(d);
    }
    let logins = || agent.ca.count(|c| matches!(c, Call::Login(_)));
    assert_eq!(logins(), 2);
    let status = match open_delta(&mut client, &jwt("c", None)).await {
        Err(status) => status,
        Ok(mut d) => {
            d.send(delta_request(&["default"], "")).await;
            d.status().await
        }
    };
    assert!(
        is(
            &status,
            Code::ResourceExhausted,
            "SDS_CONNECTION_NEW_JWT_BURST=2"
        ),
        "{status:?}"
    );
    assert_eq!(logins(), 2, "the third JWT did not reach the CA");
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

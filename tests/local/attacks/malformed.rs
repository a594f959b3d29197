//! Bytes that are not what the SDS socket expects: random bytes, HTTP/1.1,
//! gRPC messages that are not protobuf, and messages and headers too large.
//! They are refused from their header, before the agent holds their bytes.

use crate::support;

use std::time::{Duration, Instant};

use support::attack::*;
use support::sds_client::*;
use tokio_stream::StreamExt;
use tonic::Code;

use super::{
    assert_one_warning_per_interval, assert_throttled, check_rss, local_agent, served_after, Legit,
};

/// Random bytes, an HTTP/1.1 request, and gRPC messages that are not
/// protobuf: the connection is closed, or the stream refused with
/// INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_http1_and_malformed_messages() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let agent = local_agent(&[]);
    let legit = Legit::start(&agent, fake_jwt("legit", "workload")).await;
    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();

    let closes = |bytes: Vec<u8>| {
        let socket = agent.socket.clone();
        async move {
            let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
            // The agent may close before all is written.
            let _ = s.write_all(&bytes).await;
            let mut back = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
            assert!(read.is_ok(), "the connection was not closed");
            back
        }
    };
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let bytes: Vec<u8> = (0..64 * 1024).map(|_| rand::random::<u8>()).collect();
        tasks.push(tokio::spawn(closes(bytes)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let back = closes(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()).await;
    assert!(
        !String::from_utf8_lossy(&back).contains("200 OK"),
        "HTTP/1.1 is not served"
    );

    let channel = raw_channel(&agent.socket).await;
    let jwt = fake_jwt("attacker", "garbage");
    // 100 calls, 8 at a time (under SDS_CONNECTION_MAX_STREAMS).
    for batch in 0..25 {
        let mut calls = Vec::new();
        for i in 0..8 {
            let garbage: Vec<u8> = vec![0xff; 200];
            let (channel, jwt) = (channel.clone(), jwt.clone());
            calls.push(tokio::spawn(async move {
                if (batch + i) % 2 == 0 {
                    raw_unary(channel, FETCH_SECRETS, garbage, &jwt).await
                } else {
                    raw_stream(channel, STREAM_SECRETS, garbage, &jwt).await
                }
            }));
        }
        for c in calls {
            let e = c.await.unwrap().unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("not a valid protobuf"), "{e:?}");
        }
    }
    // Requests a client repeats in error (no valid credential, resources
    // not served, too many names) are refused each time, and logged once
    // per interval.
    let mut client = connect(&agent.socket).await;
    let nine: Vec<String> = (0..9).map(|i| format!("n{i}")).collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    for _ in 0..100 {
        let e = fetch(&mut client, &["default"], "not-a-jwt")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = fetch(&mut client, &["bogus"], &jwt).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
        tx.send(request(&nine, None)).await.unwrap();
        let e = inbound.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    let elapsed = started.elapsed();
    check_rss(rss.stop(), "garbage");
    legit.stop(&agent).await;
    assert_one_warning_per_interval(&agent, "malformed request", elapsed);
    assert_throttled(&agent, "refusing FetchSecrets: invalid credential", elapsed);
    assert_throttled(&agent, "refusing FetchSecrets: unknown resource", elapsed);
    assert_throttled(
        &agent,
        "SDS_MAX_RESOURCE_NAMES); this agent serves",
        elapsed,
    );
    served_after(&agent).await;
}

/// 16 MiB messages: refused from their header with RESOURCE_EXHAUSTED
/// naming SDS_MAX_REQUEST_BYTES, before their bytes are held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages() {
    let agent = local_agent(&[]);
    let legit = Legit::start(&agent, fake_jwt("legit", "workload")).await;
    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();
    let channel = raw_channel(&agent.socket).await;
    let jwt = fake_jwt("attacker", "big");
    // 24 calls, 8 at a time (under SDS_CONNECTION_MAX_STREAMS).
    for _ in 0..3 {
        let mut calls = Vec::new();
        for i in 0..8 {
            let (channel, jwt) = (channel.clone(), jwt.clone());
            calls.push(tokio::spawn(async move {
                let huge = vec![0u8; 16 << 20];
                if i % 2 == 0 {
                    raw_unary(channel, FETCH_SECRETS, huge, &jwt).await
                } else {
                    raw_stream(channel, STREAM_SECRETS, huge, &jwt).await
                }
            }));
        }
        for c in calls {
            let e = c.await.unwrap().unwrap_err();
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert!(
                e.message()
                    .contains("more than SDS_MAX_REQUEST_BYTES=262144"),
                "{e:?}"
            );
        }
    }
    let elapsed = started.elapsed();
    check_rss(rss.stop(), "oversized messages");
    legit.stop(&agent).await;
    assert_one_warning_per_interval(&agent, "SDS_MAX_REQUEST_BYTES", elapsed);
    served_after(&agent).await;
}

/// 20 KiB and 1 MiB header values: refused by HTTP/2 (SDS_MAX_HEADER_BYTES)
/// before the agent sees the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers() {
    let agent = local_agent(&[]);
    let legit = Legit::start(&agent, fake_jwt("legit", "workload")).await;
    let rss = RssSampler::start(agent.pid());
    let mut calls = Vec::new();
    for i in 0..20 {
        let socket = agent.socket.clone();
        calls.push(tokio::spawn(async move {
            let mut client = connect(&socket).await;
            let big = "x".repeat(if i % 2 == 0 { 1 << 20 } else { 20 << 10 });
            let mut req = tonic::Request::new(request(&["default"], None));
            req.metadata_mut().insert("x-padding", big.parse().unwrap());
            client.fetch_secrets(req).await
        }));
    }
    for (i, c) in calls.into_iter().enumerate() {
        let e = c.await.unwrap().unwrap_err();
        let shown = format!("{e:?}");
        if i % 2 == 1 {
            // Over SDS_MAX_HEADER_BYTES: HTTP 431, which gRPC calls UNKNOWN.
            assert_eq!(e.code(), Code::Unknown, "{shown}");
            assert!(e.message().contains("HTTP status code 431"), "{shown}");
        } else {
            // Far over it: HTTP/2 closes the connection (GOAWAY
            // ENHANCE_YOUR_CALM, RESOURCE_EXHAUSTED), or the client still
            // writing sees the connection break.
            assert!(
                (e.code() == Code::ResourceExhausted && shown.contains("ENHANCE_YOUR_CALM"))
                    || (e.code() == Code::Unknown && shown.contains("BrokenPipe")),
                "{shown}"
            );
        }
    }
    check_rss(rss.stop(), "oversized headers");
    legit.stop(&agent).await;
    served_after(&agent).await;
}

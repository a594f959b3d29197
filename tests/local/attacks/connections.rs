//! Attacks with many connections or with peers that stop talking: streams
//! past the node-wide SDS_MAX_STREAMS, connections past SDS_MAX_CONNECTIONS,
//! streams that never send a request, and a peer that goes dead. Each must
//! be refused or reaped, and its place given back, without starving the
//! legitimate workload.

use crate::support;

use std::time::{Duration, Instant};

use support::attack::*;
use support::sds_client::*;
use tokio_stream::StreamExt;
use tonic::Code;

use super::{assert_one_warning_per_interval, check_rss, local_agent, served_after};

/// Streams over many connections up to SDS_MAX_STREAMS (512): past it a new
/// stream is refused with RESOURCE_EXHAUSTED, streams already open keep
/// being served, and once the attacker leaves new streams are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_many_connections_past_the_total_cap() {
    let agent = local_agent(&[]);
    // A workload whose stream was open before the attack.
    let mut legit_client = connect(&agent.socket).await;
    let (legit_tx, mut legit_in) = open_stream(&mut legit_client, &fake_jwt("legit", "w")).await;
    legit_tx.send(request(&["default"], None)).await.unwrap();
    let first = legit_in.next().await.unwrap().unwrap();

    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();
    let jwt = fake_jwt("attacker", "many");
    let mut held = Vec::new();
    let mut clients = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let mut client = connect(&agent.socket).await;
        for _ in 0..16 {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(request(&["default"], None)).await.unwrap();
            match client
                .stream_secrets(with_jwt(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    &jwt,
                ))
                .await
            {
                Ok(resp) => {
                    let mut inbound = resp.into_inner();
                    inbound.next().await.unwrap().unwrap();
                    held.push((tx, inbound));
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    assert!(
                        e.message().contains("SDS_MAX_STREAMS=512"),
                        "{}",
                        e.message()
                    );
                    refused += 1;
                }
            }
        }
        clients.push(client);
    }
    assert_eq!(held.len(), 511, "the cap less the legitimate stream");
    assert_eq!(refused, 40 * 16 - 511);

    // During: the open stream is served (a changed subscription answered),
    // and a new stream is refused with the documented status.
    legit_tx
        .send(request(&["default", "ROOTCA"], Some(&first)))
        .await
        .unwrap();
    let resp = next_within(
        &mut legit_in,
        Duration::from_secs(10),
        "legit stream",
        || agent.log(),
    )
    .await
    .unwrap();
    assert_eq!(secrets(&resp).len(), 2);
    let err = fetch(&mut legit_client, &["default"], &fake_jwt("legit", "w"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let elapsed = started.elapsed();
    check_rss(rss.stop(), "streams over many connections");
    assert_one_warning_per_interval(&agent, "SDS_MAX_STREAMS", elapsed);

    // After: the attacker leaves; new streams are served.
    drop(held);
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fetch(&mut legit_client, &["default"], &fake_jwt("legit", "w")).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("not served after the attack: {e:?}"),
        }
    }
    served_after(&agent).await;
}

/// Streams that send no request are closed after SDS_FIRST_REQUEST_TIMEOUT
/// with DEADLINE_EXCEEDED, and give their place back; while they fill
/// SDS_MAX_STREAMS, a newcomer is served all the same: the oldest of them,
/// which has proven nothing, makes room (RESOURCE_EXHAUSTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_send_nothing_are_closed() {
    let agent = local_agent(&[
        ("SDS_FIRST_REQUEST_TIMEOUT", "1s"),
        ("SDS_MAX_STREAMS", "8"),
    ]);
    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..8 {
        let mut client = connect(&agent.socket).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<
            envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest,
        >(1);
        let inbound = client
            .stream_secrets(with_jwt(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                &fake_jwt("silent", "one"),
            ))
            .await
            .unwrap()
            .into_inner();
        silent.push((tx, inbound, client));
    }
    // The silent streams fill SDS_MAX_STREAMS; a newcomer is served, and
    // the oldest silent stream gave it its place...
    let mut client = connect(&agent.socket).await;
    fetch(&mut client, &["default"], &fake_jwt("legit", "w"))
        .await
        .unwrap_or_else(|e| panic!("the newcomer was refused: {e:?}\n{}", agent.log()));
    let mut silent = silent.into_iter();
    let (_tx, mut oldest, _client) = silent.next().unwrap();
    let e = next_within(
        &mut oldest,
        Duration::from_secs(10),
        "oldest evicted",
        || agent.log(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("SDS_MAX_STREAMS=8") && e.message().contains("proven no credential"),
        "{e:?}"
    );
    // ...and the others are closed for want of a request.
    for (_tx, mut inbound, _client) in silent {
        let e = next_within(
            &mut inbound,
            Duration::from_secs(10),
            "silent stream closed",
            || agent.log(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(
            e.message().contains("SDS_FIRST_REQUEST_TIMEOUT=1s"),
            "{e:?}"
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    check_rss(rss.stop(), "silent streams");
    assert_one_warning_per_interval(&agent, "SDS_FIRST_REQUEST_TIMEOUT", started.elapsed());
    served_after(&agent).await;
}

/// A peer that opens a stream and then goes dead (reads and writes nothing,
/// answers no PING) is cut off by HTTP/2 keep-alive, and its stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_reaps_a_dead_peer() {
    use tokio::io::AsyncWriteExt;
    let agent = local_agent(&[
        ("SDS_KEEPALIVE_INTERVAL", "1s"),
        ("SDS_KEEPALIVE_TIMEOUT", "1s"),
        ("SDS_FIRST_REQUEST_TIMEOUT", "1h"),
    ]);
    let mut dead = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    dead.write_all(&h2_open_stream_bytes()).await.unwrap();
    assert!(
        stream_one_accepted(&mut dead).await,
        "the dead peer's stream was accepted"
    );
    // From here the peer reads and writes nothing. Its stream stays open...
    let metrics = agent.status_url("/metrics");
    let streams_open = || support::metrics::gauge(&metrics, "node_agent_sds_streams_open");
    assert_eq!(streams_open().await, 1.0, "the dead peer's stream is open");
    // ...until keep-alive finds it dead and closes its connection.
    let started = Instant::now();
    while streams_open().await != 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the dead peer was never reaped\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("dead peer reaped after {:?}", started.elapsed());
    drop(dead);
}

/// Connections past SDS_MAX_CONNECTIONS are closed at once; the ones open
/// keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let agent = local_agent(&[("SDS_MAX_CONNECTIONS", "50")]);
    let mut legit = connect(&agent.socket).await;
    fetch(&mut legit, &["default"], &fake_jwt("legit", "w"))
        .await
        .unwrap();
    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..49 {
        let mut c = connect(&agent.socket).await;
        // Served, so surely accepted before the connections below.
        fetch(&mut c, &["ROOTCA"], &fake_jwt("held", "one"))
            .await
            .unwrap();
        held.push(c);
    }
    let mut closed = 0;
    for _ in 0..200 {
        let mut s = tokio::net::UnixStream::connect(&agent.socket)
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed at once, not left hanging");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        closed += 1;
    }
    assert_eq!(closed, 200);
    // The open connections are served, during and after.
    fetch(&mut legit, &["default", "ROOTCA"], &fake_jwt("legit", "w"))
        .await
        .unwrap();
    fetch(&mut held[0], &["default"], &fake_jwt("held", "one"))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    check_rss(rss.stop(), "connections past the cap");
    assert_one_warning_per_interval(&agent, "SDS_MAX_CONNECTIONS", elapsed);
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    served_after(&agent).await;
}

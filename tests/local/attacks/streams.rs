//! Attacks on one connection's streams and on what one request may name:
//! repeated and too many resource names, and a flood of streams on one
//! connection, which SDS_CONNECTION_MAX_STREAMS bounds while the legitimate
//! workload is still served.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use support::attack::*;
use support::sds_client::*;
use tokio_stream::StreamExt;
use tonic::Code;

use super::{assert_one_warning_per_interval, check_rss, local_agent, served_after, Legit};

/// Requests naming `default` tens of thousands of times are answered with
/// one resource; a request too large to hold is refused from its header; a
/// request naming too many distinct resources is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplification_by_repeated_resource_names() {
    let agent = local_agent(&[]);
    let legit = Legit::start(&agent, fake_jwt("legit", "workload")).await;
    let rss = RssSampler::start(agent.pid());

    let jwt = fake_jwt("attacker", "amplifier");
    let repeated = vec!["default"; 25_000]; // 225 KB, under SDS_MAX_REQUEST_BYTES
    let huge = vec!["default"; 300_000]; // 3.6 MB
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let (socket, jwt, repeated, huge) = (
            agent.socket.clone(),
            jwt.clone(),
            repeated.clone(),
            huge.clone(),
        );
        attackers.push(tokio::spawn(async move {
            let mut client = connect(&socket).await;
            for _ in 0..10 {
                let resp = fetch(&mut client, &repeated, &jwt).await.unwrap();
                assert_eq!(secrets(&resp).len(), 1, "one resource for 25 000 names");
                assert!(resp.encoded_len() < 16 * 1024);
                let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
                tx.send(request(&repeated, None)).await.unwrap();
                let resp = inbound.next().await.unwrap().unwrap();
                assert_eq!(secrets(&resp).len(), 1);
                let err = fetch(&mut client, &huge, &jwt).await.unwrap_err();
                assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
                assert!(
                    err.message().contains("SDS_MAX_REQUEST_BYTES=262144"),
                    "{}",
                    err.message()
                );
            }
        }));
    }
    for a in attackers {
        a.await.unwrap();
    }
    let mut client = connect(&agent.socket).await;
    let nine: Vec<String> = (0..9).map(|i| format!("n{i}")).collect();
    let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
    let err = fetch(&mut client, &nine, &jwt).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("SDS_MAX_RESOURCE_NAMES"), "{err:?}");

    check_rss(rss.stop(), "amplification");
    legit.stop(&agent).await;
    served_after(&agent).await;
}

/// 20 000 streams on one connection: SDS_CONNECTION_MAX_STREAMS (16) are
/// served, every other one is refused at once with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flood_on_one_connection() {
    let agent = local_agent(&[]);
    let legit = Legit::start(&agent, fake_jwt("legit", "workload")).await;
    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();

    let client = connect(&agent.socket).await;
    let jwt = fake_jwt("attacker", "flood");
    let mut tasks = Vec::new();
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    for _ in 0..20_000 {
        let (mut client, jwt, held) = (client.clone(), jwt.clone(), held.clone());
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(request(&["default"], None)).await.unwrap();
            let opened = client
                .stream_secrets(with_jwt(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    &jwt,
                ))
                .await;
            match opened {
                Ok(resp) => {
                    let mut inbound = resp.into_inner();
                    let first = inbound.next().await.unwrap()?;
                    held.lock().await.push((tx, inbound, first));
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }));
    }
    // Past the setting, the agent refuses each stream, naming it. HTTP/2
    // itself refuses a few (REFUSED_STREAM) that the client opened before it
    // saw others end. Were HTTP/2's flood guards to close the connection
    // (GOAWAY ENHANCE_YOUR_CALM, which gRPC reports as RESOURCE_EXHAUSTED),
    // its queued streams would fail, and so would the held ones below.
    let (mut served, mut ours, mut calm, mut closed) = (0, 0, 0, 0);
    // Streams the agent neither serves nor refuses would wait for ever.
    let give_up = Instant::now() + Duration::from_secs(120);
    for t in tasks {
        let outcome = tokio::time::timeout_at(give_up.into(), t)
            .await
            .unwrap_or_else(|_| panic!("streams neither served nor refused\n{}", agent.log()));
        match outcome.unwrap() {
            Ok(()) => served += 1,
            Err(e) if e.message().contains("SDS_CONNECTION_MAX_STREAMS=16") => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                ours += 1;
            }
            Err(e) if format!("{e:?}").contains("ENHANCE_YOUR_CALM") => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                calm += 1;
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.code(),
                        Code::Cancelled | Code::Unknown | Code::Unavailable
                    ),
                    "{e:?}"
                );
                closed += 1;
            }
        }
    }
    println!(
        "stream flood: {served} served, {ours} refused naming the setting, \
         {calm} ENHANCE_YOUR_CALM, {closed} failed with the closed connection"
    );
    assert_eq!(served, 16, "SDS_CONNECTION_MAX_STREAMS streams served");
    assert!(ours >= 1000, "the agent refused them, naming the setting");
    let m = support::metrics::scrape(&agent.status_url("/metrics"), "prometheus").await;
    let counted = m.get(
        "node_agent_sds_requests_refused_total",
        &[("reason", "limits")],
    );
    assert!(
        counted >= ours as f64,
        "{counted} refusals counted, {ours} seen"
    );
    // The streams the connection holds are still served after the flood
    // was refused: each gets an answer to a changed subscription.
    let mut held = std::mem::take(&mut *held.lock().await);
    assert_eq!(held.len(), 16);
    for (tx, inbound, first) in &mut held {
        tx.send(request(&["default", "ROOTCA"], Some(first)))
            .await
            .unwrap_or_else(|_| panic!("a held stream was closed\n{}", agent.log()));
        let resp = next_within(inbound, Duration::from_secs(10), "held stream", || {
            agent.log()
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "a stream held through the flood was not served: {e:?}\n{}",
                agent.log()
            )
        });
        assert_eq!(secrets(&resp).len(), 2);
    }
    let elapsed = started.elapsed();
    check_rss(rss.stop(), "stream flood on one connection");
    legit.stop(&agent).await;
    assert_one_warning_per_interval(&agent, "SDS_CONNECTION_MAX_STREAMS", elapsed);
    drop(held);
    served_after(&agent).await;
}

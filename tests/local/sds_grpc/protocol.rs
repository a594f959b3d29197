//! The SDS protocol as a client sees it: FetchSecrets returns the workload's
//! certificate and root (its key never logged); on a stream, ACKs, NACKs and
//! stale nonces are answered as Envoy expects, a NACKed secret is not resent
//! but the next change is, duplicate names collapse and too many are refused,
//! a half-closed stream is answered before it ends, and streams waiting for
//! the request budget are all answered.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::sds_client::fake_jwt;
use support::sds_client::*;
use tokio_stream::StreamExt;
use tonic::Code;

use super::{local_agent, nack, names_of, next};

#[tokio::test]
async fn fetch_secrets_returns_the_workload_certificate_and_root() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "httpbin");
    let resp = fetch(&mut client, &["default", "ROOTCA"], &jwt)
        .await
        .expect("FetchSecrets succeeds");
    assert_eq!(resp.type_url, SECRET_TYPE);
    assert!(!resp.version_info.is_empty() && !resp.nonce.is_empty());
    let got = secrets(&resp);
    assert_eq!(
        got.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["default", "ROOTCA"]
    );
    let (chain, key) = tls_certificate(&got[0]);
    let (uris, _) = leaf_facts(&chain);
    assert_eq!(uris, ["spiffe://cluster.local/ns/default/sa/httpbin"]);
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 key");
    let root = trusted_ca(&got[1]);
    assert!(root.contains("BEGIN CERTIFICATE"));

    // A second fetch is served from the cache: same certificate, same key.
    let again = fetch(&mut client, &["default"], &jwt).await.unwrap();
    assert_eq!(
        tls_certificate(&secrets(&again)[0]),
        (chain.clone(), key.clone())
    );

    // The key never reaches the log: not its secret part (the first 40
    // characters of a PKCS#8 PEM body are a header every key shares).
    let log = agent.log();
    let (secret_b64, secret_hex) = ec_p256_secret(&key);
    for piece in &secret_b64 {
        assert!(!log.contains(piece), "private key material in the log");
    }
    assert!(
        !log.to_ascii_lowercase().contains(&secret_hex),
        "private key scalar (hex) in the log"
    );
    assert!(!log.contains(&jwt), "JWT in the log");
}

/// The parts of an EC P-256 PKCS#8 PEM key unique to it: the base64 of its
/// private scalar (which follows a 36-byte header every such key shares), in
/// the two pieces the PEM's line break leaves, and the scalar in hex.
fn ec_p256_secret(pem: &str) -> (Vec<String>, String) {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(&body)
        .unwrap();
    assert_eq!(der.len(), 138, "an EC P-256 PKCS#8 key");
    let scalar = &der[36..68];
    // Base64 characters 48..88 encode bytes 36..66, scalar bytes only; a
    // PEM line holds 64 characters.
    let b64 = vec![body[48..64].to_string(), body[64..88].to_string()];
    let hex = scalar.iter().map(|b| format!("{b:02x}")).collect();
    (b64, hex)
}

/// Requests on a stream are read in order, so a message that must get no
/// reply is followed by one that must: the next response answering the
/// second proves the first was read and left unanswered, without waiting
/// for "nothing".
#[tokio::test]
async fn stream_state_machine_acks_nacks_and_stale_nonces() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("ns1", "sa1");
    let (tx, mut inbound) = open_stream(&mut client, &jwt).await;

    tx.send(request(&["default"], None)).await.unwrap();
    let first = next(&mut inbound, "the first request is answered", &agent).await;
    assert_eq!(names_of(&first), ["default"]);
    let (chain, key) = tls_certificate(&secrets(&first)[0]);
    assert_eq!(
        leaf_facts(&chain).0,
        ["spiffe://cluster.local/ns/ns1/sa/sa1"]
    );

    // ACK, the name repeated (names are a set): no reply. Then a changed
    // subscription, which is answered.
    tx.send(request(&["default", "default"], Some(&first)))
        .await
        .unwrap();
    tx.send(request(&["default", "ROOTCA"], Some(&first)))
        .await
        .unwrap();
    let second = next(&mut inbound, "a changed subscription is answered", &agent).await;
    assert_eq!(
        names_of(&second),
        ["default", "ROOTCA"],
        "the ACK was not answered: the next response is the change's"
    );
    assert_ne!(second.nonce, first.nonce);

    // NACK, the same names in another order: logged, not answered with the
    // same secret. Then a changed subscription, which is answered.
    tx.send(nack(&["ROOTCA", "default"], &second))
        .await
        .unwrap();
    tx.send(request(&["ROOTCA"], Some(&second))).await.unwrap();
    let third = next(&mut inbound, "a change after a NACK is answered", &agent).await;
    assert_eq!(
        names_of(&third),
        ["ROOTCA"],
        "the NACK was not answered: the next response is the change's"
    );
    agent.wait_log(
        "Envoy rejected the SDS response (NACK): Failed to load certificate chain from <inline>",
        Duration::from_secs(5),
    );

    // A stale nonce is ignored, even when it asks for something else.
    tx.send(request(&["default", "ROOTCA"], Some(&second)))
        .await
        .unwrap();
    tx.send(request(&["default"], Some(&third))).await.unwrap();
    let fourth = next(&mut inbound, "a current change is answered", &agent).await;
    assert_eq!(
        names_of(&fourth),
        ["default"],
        "the stale request was ignored: the next response is the current one's"
    );

    // A NACK that also changes the names is a new subscription: answered.
    tx.send(nack(&["default", "ROOTCA"], &fourth))
        .await
        .unwrap();
    let fifth = next(
        &mut inbound,
        "a NACK changing the names is answered",
        &agent,
    )
    .await;
    assert_eq!(names_of(&fifth), ["default", "ROOTCA"]);
    let s = secrets(&fifth);
    assert_eq!(
        tls_certificate(&s[0]),
        (chain.clone(), key.clone()),
        "no new key for a repeated request"
    );

    // Another stream for the same identity shares the certificate and key.
    let mut other = connect(&agent.socket).await;
    let resp = fetch(&mut other, &["default"], &jwt).await.unwrap();
    assert_eq!(tls_certificate(&secrets(&resp)[0]), (chain, key));
}

/// After a NACK the same secret is never sent again, but the next change is:
/// the renewal is the next message on the stream.
#[tokio::test]
async fn a_nacked_secret_is_not_resent_but_the_next_change_is_pushed() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "4s".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &fake_jwt("nack", "me")).await;
    tx.send(request(&["default", "ROOTCA"], None))
        .await
        .unwrap();
    let first = next(&mut inbound, "the first request is answered", &agent).await;
    tx.send(nack(&["default", "ROOTCA"], &first)).await.unwrap();
    // Renewal at half the 4 s lifetime.
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(6),
        "the renewal after a NACK is pushed",
        || agent.log(),
    )
    .await
    .unwrap();
    assert_ne!(
        pushed.version_info, first.version_info,
        "the NACKed version was sent again"
    );
    assert_ne!(
        tls_certificate(&secrets(&pushed)[0]),
        tls_certificate(&secrets(&first)[0]),
        "the renewed certificate and key"
    );
    assert!(agent.log().contains("renewed workload certificate"));
}

/// Duplicate names collapse; too many distinct ones are refused, saying why.
#[tokio::test]
async fn duplicate_names_collapse_and_too_many_are_refused() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("many", "names");
    let many = vec!["default"; 5000];
    let resp = fetch(&mut client, &many, &jwt).await.unwrap();
    assert_eq!(names_of(&resp), ["default"], "one resource, not 5000");
    let mut dup = vec!["ROOTCA"; 10];
    dup.extend(["default"; 10]);
    let resp = fetch(&mut client, &dup, &jwt).await.unwrap();
    assert_eq!(names_of(&resp), ["ROOTCA", "default"]);

    let distinct: Vec<String> = (0..9).map(|i| format!("name{i}")).collect();
    let distinct: Vec<&str> = distinct.iter().map(String::as_str).collect();
    let err = fetch(&mut client, &distinct, &jwt).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("more than 8 distinct resources (SDS_MAX_RESOURCE_NAMES)"),
        "{}",
        err.message()
    );
    let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
    tx.send(request(&distinct, None)).await.unwrap();
    let err = inbound.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A client that sends its request and half-closes (as grpcurl or a one-shot
/// fetcher does) is answered before the stream ends: a half-close says "no
/// more requests", not "cancel".
#[tokio::test]
async fn a_half_closed_stream_is_answered_then_ended() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "half-closed");
    let mut inbound = client
        .stream_secrets(with_jwt(
            tokio_stream::iter(vec![request(&["default"], None)]),
            &jwt,
        ))
        .await
        .expect("open StreamSecrets")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("an answer within 10 s")
        .expect("no error status")
        .expect("a response before the stream ends");
    assert_eq!(
        served_uris(&first),
        ["spiffe://cluster.local/ns/default/sa/half-closed"]
    );
    let end = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("the stream ends once answered");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// Streams of one connection, each sending an Envoy-sized request (60 KiB)
/// while the buffered-request budget holds one such request at a time, are
/// all answered. Streams waiting for budget hold what their client sent them
/// (a stream window each) in HTTP/2's buffers; with a connection window of
/// 64 KiB, four of them left the stream holding the budget no window for the
/// rest of its request, and every stream ended with DEADLINE_EXCEEDED
/// (h2load's 100 connections of 10 streams did, in the benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_waiting_for_request_budget_leave_their_connection_window() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SDS_MAX_REQUEST_BYTES", "65536".into()),
        ("SDS_MAX_BUFFERED_REQUEST_BYTES", "70000".into()),
        ("SDS_FIRST_REQUEST_TIMEOUT", "5s".into()),
    ]);
    let client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "big-requests");
    let mut req = request(&["default"], None);
    req.node = Some(envoy_types::pb::envoy::config::core::v3::Node {
        id: "x".repeat(60 * 1024),
        ..Default::default()
    });
    // 12 streams on one connection (under SDS_CONNECTION_MAX_STREAMS=16).
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let mut c = client.clone();
            let r = with_jwt(req.clone(), &jwt);
            tokio::spawn(async move { c.fetch_secrets(r).await })
        })
        .collect();
    for c in calls {
        let resp = c
            .await
            .unwrap()
            .expect("every stream is served (none ends with DEADLINE_EXCEEDED)");
        assert_eq!(
            served_uris(resp.get_ref()),
            ["spiffe://cluster.local/ns/default/sa/big-requests"]
        );
    }
}

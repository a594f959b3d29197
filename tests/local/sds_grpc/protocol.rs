//! The SDS protocol as a client sees it: FetchSecrets returns the workload's
//! certificate and root (its key never logged), and streams waiting for the
//! request budget are all answered.

use crate::support;

use support::agent::Agent;
use support::sds_client::fake_jwt;
use support::sds_client::*;

use super::local_agent;

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

//! `DeltaSecrets` subscriptions as the xDS delta protocol has them, on one
//! stream and the next: repeats collapse; an ACK and a NACK are not
//! answered, and the NACKed version is not sent again while the next change
//! is, alone; unknown names are answered as removed; a name unsubscribed and
//! subscribed again is sent again; a reconnect claiming the versions it holds
//! with another stream's nonce is answered in full; every nonce is new; and
//! both protocols are served from one cache.

use std::collections::{HashMap, HashSet};

use super::*;

/// (name, version) of each resource of a response, checking that each is
/// the `Secret` of its name and has a version.
fn carried(resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    assert_eq!(resp.type_url, SECRET_TYPE_URL);
    resp.resources
        .iter()
        .map(|r| {
            let secret = decode(r.resource.as_ref().expect("a resource body"));
            assert_eq!(secret.name, r.name, "resource and secret names agree");
            assert!(!r.version.is_empty(), "every resource has a version");
            (r.name.clone(), r.version.clone())
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn delta_subscribe_ack_nack_removed_and_stale_nonces() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let mut nonces = HashSet::new();
    let mut unique = |r: &DeltaDiscoveryResponse| {
        assert!(!r.nonce.is_empty(), "every response has a nonce");
        assert!(nonces.insert(r.nonce.clone()), "nonce {} reused", r.nonce);
    };

    // Subscribe, with a repeat: one resource per name, named and versioned.
    let mut a = open_delta(&mut client, &x).await.unwrap();
    a.send(delta_request(&["default", "ROOTCA", "default"], ""))
        .await;
    let first = a.response().await;
    unique(&first);
    let versions: HashMap<String, String> = carried(&first).into_iter().collect();
    assert_eq!(delta_names(&first), ["default", "ROOTCA"]);
    assert!(first.removed_resources.is_empty());
    let default = delta_secret_named(&first, "default");
    assert_eq!(uris(&default), ["spiffe://td/ns/ns/sa/x"]);
    let (_, key) = chain_and_key(&default);
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(trusted_ca(&delta_secret_named(&first, "ROOTCA")).contains("BEGIN CERTIFICATE"));

    // An ACK is not answered: the next response answers the request after
    // it (responses are in order), removing an unknown name.
    a.send(delta_request(&[], &first.nonce)).await;
    a.send(delta_request(&["no-such-secret"], "")).await;
    let removed = a.response().await;
    unique(&removed);
    assert!(removed.resources.is_empty(), "{removed:?}");
    assert_eq!(removed.removed_resources, ["no-such-secret"]);

    // Unsubscribed, then subscribed again: sent although nothing changed.
    a.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec!["ROOTCA".into()],
        ..delta_request(&[], &removed.nonce)
    })
    .await;
    a.send(delta_request(&["ROOTCA"], "")).await;
    let again = a.response().await;
    unique(&again);
    assert_eq!(
        carried(&again),
        [("ROOTCA".to_string(), versions["ROOTCA"].clone())]
    );

    // A NACK is not answered, and the NACKed version is not sent again...
    let mut nack = delta_request(&[], &again.nonce);
    nack.error_detail = nack_detail();
    a.send(nack).await;
    a.send(delta_request(&["other-unknown"], "")).await;
    let after_nack = a.response().await;
    unique(&after_nack);
    assert_eq!(after_nack.removed_resources, ["other-unknown"]);
    // ...but the next change is: the renewal brings only the changed
    // `default`, not the unchanged ROOTCA, before the certificate expires.
    let started = tokio::time::Instant::now();
    tokio::time::advance(RENEWAL).await;
    let rotated = a.response().await;
    unique(&rotated);
    let got = carried(&rotated);
    assert_eq!(got.len(), 1, "only the changed resource: {got:?}");
    assert_eq!(got[0].0, "default");
    assert_ne!(got[0].1, versions["default"], "a new certificate version");
    assert!(started.elapsed() < TTL);

    // A second stream of the identity whose initial_resource_versions claim
    // the current versions (a reconnect) is still answered in full, a nonce
    // of "a previous stream" tolerated; one cache: the same certificate and
    // key as the first stream's.
    let mut b = open_delta(&mut client, &x).await.unwrap();
    let current: HashMap<String, String> = [
        ("default".to_string(), got[0].1.clone()),
        ("ROOTCA".to_string(), versions["ROOTCA"].clone()),
    ]
    .into();
    b.send(DeltaDiscoveryRequest {
        initial_resource_versions: current.clone(),
        ..delta_request(&["default", "ROOTCA"], "deadbeef-1-1")
    })
    .await;
    let reconnect = b.response().await;
    unique(&reconnect);
    let got: HashMap<String, String> = carried(&reconnect).into_iter().collect();
    assert_eq!(got, current, "answered with exactly the current versions");
    let renewed = chain_and_key(&delta_secret_named(&rotated, "default"));
    assert_eq!(
        chain_and_key(&delta_secret_named(&reconnect, "default")),
        renewed,
        "one cache: the same certificate and key on both streams"
    );

    // StreamSecrets of the identity gets the very same certificate.
    let sotw = fetch(&mut client, &["default"], &x).await.unwrap();
    assert_eq!(chain_and_key(&secret_named(&sotw, "default")), renewed);
    let log = agent.log();
    assert_eq!(
        log.matches("issued workload certificate").count(),
        1,
        "one issue for the identity whatever the protocol:\n{log}"
    );
    assert!(
        log.contains("Envoy rejected the SDS delta response (NACK)"),
        "{log}"
    );
    assert!(!log.contains(x.expose()), "JWT in the log");
    let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!log.contains(&body[0][..40]), "key material in the log");
    for line in body {
        assert!(!log.contains(line), "key material in the log");
    }
}

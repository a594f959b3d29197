//! Delta SDS from a Rust client: subscribe, ACK, NACK, removed resources and
//! stale nonces as the xDS delta protocol has them; refusals with the
//! documented status; and delta streams held to every bound `StreamSecrets`
//! streams are, each refusal naming its setting.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use support::agent::Agent;
use support::sds_client::*;
use tonic::transport::Channel;
use tonic::Code;

use super::{carried, delta, nack, names, secret_of, summary, DeltaStream, WAIT};

#[tokio::test]
async fn delta_protocol_subscribe_ack_nack_removed_and_stale_nonces() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "6s".into()),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "httpbin");
    let mut nonces = HashSet::new();
    let mut unique = |r: &DeltaDiscoveryResponse| {
        assert!(!r.nonce.is_empty(), "every response has a nonce");
        assert!(nonces.insert(r.nonce.clone()), "nonce {} reused", r.nonce);
    };

    // Subscribe (with a duplicate): one resource per name, each named and versioned.
    let mut a = DeltaStream::open(&mut client, Some(&jwt)).await;
    a.send(delta(&["default", "ROOTCA", "default"], &[], None))
        .await;
    let first = a.next_ok("first subscribe", &agent).await;
    unique(&first);
    let versions: HashMap<String, String> = carried(&first).into_iter().collect();
    assert_eq!(names(&first), ["default", "ROOTCA"], "{}", summary(&first));
    assert!(first.removed_resources.is_empty());
    let (chain, key) = tls_certificate(&secret_of(&first, "default"));
    assert_eq!(
        leaf_facts(&chain).0,
        ["spiffe://cluster.local/ns/default/sa/httpbin"]
    );
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(trusted_ca(&secret_of(&first, "ROOTCA")).contains("BEGIN CERTIFICATE"));

    // An ACK is not answered: the next message on the stream is the answer to
    // the request after it (responses are in order), removing an unknown name.
    a.send(delta(&[], &[], Some(&first.nonce))).await;
    a.send(delta(&["no-such-secret"], &[], None)).await;
    let removed = a.next_ok("unknown name", &agent).await;
    unique(&removed);
    assert!(removed.resources.is_empty(), "{}", summary(&removed));
    assert_eq!(removed.removed_resources, ["no-such-secret"]);

    // Unsubscribe then subscribe again: answered although nothing changed.
    a.send(delta(&[], &["ROOTCA"], Some(&removed.nonce))).await;
    a.send(delta(&["ROOTCA"], &[], None)).await;
    let again = a.next_ok("re-subscribe", &agent).await;
    unique(&again);
    assert_eq!(
        carried(&again),
        [("ROOTCA".to_string(), versions["ROOTCA"].clone())]
    );

    // A NACK is not answered, and the NACKed version is not sent again...
    a.send(nack(&again.nonce)).await;
    a.send(delta(&["other-unknown"], &[], None)).await;
    let after_nack = a.next_ok("after NACK", &agent).await;
    unique(&after_nack);
    assert_eq!(
        after_nack.removed_resources,
        ["other-unknown"],
        "{}",
        summary(&after_nack)
    );
    // ...but the next change is: the rotation (SECRET_TTL=6s, renewed at half
    // life) brings only the changed `default`, not the unchanged ROOTCA.
    let started = Instant::now();
    let rotated = a.next_ok("rotation push", &agent).await;
    unique(&rotated);
    let got = carried(&rotated);
    assert_eq!(got.len(), 1, "only the changed resource: {got:?}");
    assert_eq!(got[0].0, "default");
    assert_ne!(got[0].1, versions["default"], "a new certificate version");
    assert!(started.elapsed() < Duration::from_secs(6));

    // A second stream of the same identity whose initial_resource_versions
    // claim the current versions (a reconnect) is still answered in full, with
    // a stale nonce from "a previous stream" tolerated; it shares the cache:
    // the same certificate as the first stream.
    let mut b = DeltaStream::open(&mut client, Some(&jwt)).await;
    let current: HashMap<String, String> = [
        ("default".to_string(), got[0].1.clone()),
        ("ROOTCA".to_string(), versions["ROOTCA"].clone()),
    ]
    .into();
    b.send(DeltaDiscoveryRequest {
        initial_resource_versions: current.clone(),
        ..delta(&["default", "ROOTCA"], &[], Some("deadbeef-1-1"))
    })
    .await;
    let reconnect = b.next_ok("reconnect with current versions", &agent).await;
    unique(&reconnect);
    let got: HashMap<String, String> = carried(&reconnect).into_iter().collect();
    assert_eq!(got, current, "answered with exactly the current versions");
    assert_eq!(
        tls_certificate(&secret_of(&reconnect, "default")),
        tls_certificate(&secret_of(&rotated, "default")),
        "one cache: the same certificate and key on both streams"
    );

    // StreamSecrets of the same identity gets the very same certificate.
    let sotw = fetch(&mut client, &["default"], &jwt).await.unwrap();
    assert_eq!(
        tls_certificate(&secrets(&sotw)[0]),
        tls_certificate(&secret_of(&reconnect, "default"))
    );
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
    assert!(!log.contains(&jwt), "JWT in the log");
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!log.contains(&body[..40]), "key material in the log");
}

#[tokio::test]
async fn delta_refusals_carry_the_documented_status() {
    let agent = Agent::start(&[("CA_PROVIDER", "LocalCA".into())]);
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "sleep");

    let mut s = DeltaStream::open(&mut client, None).await;
    s.send(delta(&["default"], &[], None)).await;
    let err = s.next("no credential", &agent).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("WORKLOAD_TOKEN_PATH"), "{err:?}");

    let mut s = DeltaStream::open(&mut client, Some(&jwt)).await;
    s.send(DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..delta(&["default"], &[], None)
    })
    .await;
    let err = s.next("wrong type", &agent).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Positive control on the same connection: a valid stream is served.
    let mut s = DeltaStream::open(&mut client, Some(&jwt)).await;
    s.send(delta(&["default"], &[], None)).await;
    assert_eq!(names(&s.next_ok("valid", &agent).await), ["default"]);
}

/// A stream that should be served: its first response carries `default`.
async fn served(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    jwt: &str,
    agent: &Agent,
) -> DeltaStream {
    let mut s = DeltaStream::open(client, Some(jwt)).await;
    s.send(delta(&["default"], &[], None)).await;
    assert_eq!(
        names(&s.next_ok("a stream within the bounds", agent).await),
        ["default"]
    );
    s
}

/// The refusal of a stream past a cap, or a panic.
async fn refused(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    jwt: &str,
    agent: &Agent,
) -> tonic::Status {
    match DeltaStream::try_open(client, Some(jwt)).await {
        Err(status) => status,
        Ok(mut s) => {
            s.send(delta(&["default"], &[], None)).await;
            s.next_err("a stream past a cap", agent).await
        }
    }
}

/// `DeltaSecrets` streams are held to every bound `StreamSecrets` streams
/// are, by the same code: streams per connection and in total,
/// names per request, request size, the first-request deadline, and the
/// connection's budget of new JWTs. Each refusal names its setting; each
/// check has a positive control just inside the bound.
#[tokio::test]
async fn delta_streams_obey_the_sds_bounds() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SDS_CONNECTION_MAX_STREAMS", "3".into()),
        ("SDS_MAX_STREAMS", "5".into()),
        ("SDS_MAX_RESOURCE_NAMES", "4".into()),
        ("SDS_MAX_REQUEST_BYTES", "16KiB".into()),
        ("SDS_FIRST_REQUEST_TIMEOUT", "1s".into()),
        ("SDS_CONNECTION_NEW_JWT_BURST", "2".into()),
        ("SDS_CONNECTION_NEW_JWT_INTERVAL", "1h".into()),
    ]);
    let jwt = fake_jwt("bounds", "delta");

    // SDS_CONNECTION_MAX_STREAMS: three delta streams on one connection are
    // served, the fourth is refused.
    let mut one = connect(&agent.socket).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(served(&mut one, &jwt, &agent).await);
    }
    let e = refused(&mut one, &jwt, &agent).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("SDS_CONNECTION_MAX_STREAMS=3"),
        "{e:?}"
    );

    // SDS_MAX_STREAMS: two more on another connection make five; the sixth
    // is refused, and served once a place is given back.
    let mut two = connect(&agent.socket).await;
    held.push(served(&mut two, &jwt, &agent).await);
    held.push(served(&mut two, &jwt, &agent).await);
    let mut three = connect(&agent.socket).await;
    let e = refused(&mut three, &jwt, &agent).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("SDS_MAX_STREAMS=5"), "{e:?}");
    drop(held);
    let deadline = Instant::now() + WAIT;
    let s = loop {
        match DeltaStream::try_open(&mut three, Some(&jwt)).await {
            Ok(mut s) => {
                s.send(delta(&["default"], &[], None)).await;
                let resp = s.next_ok("after the streams closed", &agent).await;
                assert_eq!(names(&resp), ["default"]);
                break s;
            }
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("places not given back: {e:?}\n{}", agent.log()),
        }
    };
    drop(s);

    // SDS_MAX_RESOURCE_NAMES: four distinct names are answered (two served,
    // two removed); five, to subscribe or to unsubscribe, are refused.
    let mut four = connect(&agent.socket).await;
    let mut s = DeltaStream::open(&mut four, Some(&jwt)).await;
    s.send(delta(
        &["default", "ROOTCA", "x1", "x2", "default"],
        &[],
        None,
    ))
    .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let resp = s.next_ok("four distinct names", &agent).await;
        got.extend(names(&resp));
        got.extend(resp.removed_resources);
    }
    got.sort();
    assert_eq!(got, ["ROOTCA", "default", "x1", "x2"]);
    drop(s);
    let five = ["default", "ROOTCA", "x1", "x2", "x3"];
    for (sub, unsub) in [(&five[..], &[][..]), (&["default"][..], &five[..])] {
        let mut s = DeltaStream::open(&mut four, Some(&jwt)).await;
        s.send(delta(sub, unsub, None)).await;
        let e = s.next_err("five distinct names", &agent).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message()
                .contains("more than 4 distinct resources (SDS_MAX_RESOURCE_NAMES)"),
            "{e:?}"
        );
    }

    // SDS_MAX_REQUEST_BYTES: a 20 KiB request is refused from its header; a
    // 12 KiB one is read (its unknown name answered as removed).
    let mut s = DeltaStream::open(&mut four, Some(&jwt)).await;
    let small = "s".repeat(12 << 10);
    s.send(delta(&[&small], &[], None)).await;
    let resp = s
        .next_ok("a request under SDS_MAX_REQUEST_BYTES", &agent)
        .await;
    assert_eq!(resp.removed_resources, [small]);
    let big = "b".repeat(20 << 10);
    s.send(delta(&[&big], &[], None)).await;
    let e = s
        .next_err("a request over SDS_MAX_REQUEST_BYTES", &agent)
        .await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("more than SDS_MAX_REQUEST_BYTES=16384"),
        "{e:?}"
    );

    // SDS_FIRST_REQUEST_TIMEOUT: a stream that sends nothing is closed.
    let started = Instant::now();
    let mut s = DeltaStream::open(&mut four, Some(&jwt)).await;
    let e = s.next_err("a silent stream", &agent).await;
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("SDS_FIRST_REQUEST_TIMEOUT=1s"),
        "{e:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    // SDS_CONNECTION_NEW_JWT_BURST: a connection's two new JWTs are served,
    // its third is refused without reaching the CA.
    let mut five_conn = connect(&agent.socket).await;
    let _a = served(&mut five_conn, &fake_jwt("burst", "a"), &agent).await;
    let _b = served(&mut five_conn, &fake_jwt("burst", "b"), &agent).await;
    let e = refused(&mut five_conn, &fake_jwt("burst", "c"), &agent).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("SDS_CONNECTION_NEW_JWT_BURST=2"),
        "{e:?}"
    );
}

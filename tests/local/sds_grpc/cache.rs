//! The secret cache behind the streams: an identity nobody watches is evicted
//! and not renewed (costing no CPU), a stream keeps reading requests while its
//! first fetch waits on Vault, and what the server does is counted in metrics.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::sds_client::fake_jwt;
use support::sds_client::*;
use tonic::Code;

use super::{local_agent, nack, names_of, next};

#[tokio::test]
async fn an_identity_nobody_watches_is_evicted() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_EVICTION_PERIOD", "1s".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("gone", "soon");
    let first = fetch(&mut client, &["default"], &jwt).await.unwrap();
    agent.wait_log("evicted idle identity and its key", Duration::from_secs(10));
    // Asking again makes a new key and certificate.
    let again = fetch(&mut client, &["default"], &jwt).await.unwrap();
    assert_ne!(
        tls_certificate(&secrets(&first)[0]).1,
        tls_certificate(&secrets(&again)[0]).1
    );
}

#[tokio::test]
async fn an_unwatched_identity_is_not_renewed_and_costs_no_cpu() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "2s".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("idle", "one");
    fetch(&mut client, &["default"], &jwt).await.unwrap();
    let before = agent.cpu_time();
    // Past the renewal time and the expiry, with nobody watching.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let used = agent.cpu_time() - before;
    assert!(
        used < Duration::from_millis(500),
        "an idle agent used {used:?} of CPU"
    );
    assert!(
        !agent.log().contains("renewed workload certificate"),
        "{}",
        agent.log()
    );
    // Asked again, it issues a fresh certificate.
    let again = fetch(&mut client, &["default"], &jwt).await.unwrap();
    assert!(!secrets(&again).is_empty());
    assert_eq!(
        agent.log().matches("issued workload certificate").count(),
        2
    );
}

/// A stream keeps reading requests while its first fetch waits on Vault: a
/// request is refused, and a changed subscription taken, while Vault (slowed
/// by a front that counts what it is asked) is still being asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keeps_reading_while_its_first_fetch_waits_on_vault() {
    use std::sync::atomic::Ordering;
    use support::vault_env::VaultEnv;
    use support::vault_front::{Tamper, VaultFront};

    let env = VaultEnv::start().await;
    let front = VaultFront::start(
        env.bao.addr(),
        env.bao.client().clone(),
        Tamper::None,
        Duration::from_secs(2),
    )
    .await;
    let agent = Agent::start(&env.agent_env_with(&[
        ("VAULT_ADDR", front.url.as_str()),
        ("CA_ADDR", front.url.as_str()),
    ]));
    let in_flight = || front.stats.in_flight.load(Ordering::SeqCst);
    let mut client = connect(&agent.socket).await;
    let jwt = env.jwt("default", "httpbin");

    // Stream A asks for `default`; once Vault is being asked, it changes to
    // `ROOTCA` (a new request, no nonce).
    let (tx_a, mut inbound_a) = open_stream(&mut client, &jwt).await;
    tx_a.send(request(&["default"], None)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while in_flight() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "Vault never asked\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx_a.send(request(&["ROOTCA"], None)).await.unwrap();

    // Stream B, same JWT, sends a request then a bad one: refused at once.
    let (tx_b, mut inbound_b) = open_stream(&mut client, &jwt).await;
    tx_b.send(request(&["default"], None)).await.unwrap();
    let mut bad = request(&["default"], None);
    bad.type_url = "type.googleapis.com/not.a.Secret".into();
    tx_b.send(bad).await.unwrap();
    let err = next_within(
        &mut inbound_b,
        Duration::from_secs(10),
        "B's refusal",
        || agent.log(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        in_flight() > 0,
        "the refusal came while Vault was still being asked"
    );

    // A is served once Vault has answered, with the names of its latest request.
    let first = next(&mut inbound_a, "A is served", &agent).await;
    assert_eq!(
        names_of(&first),
        ["ROOTCA"],
        "the change was taken while the fetch waited"
    );
    assert_eq!(env.count("auth/kubernetes/login"), 1, "one login for both");
}

/// What the SDS server does is counted: pushes by resource, streams open,
/// NACKs, refusals by reason.
#[tokio::test]
async fn sds_events_are_counted_in_metrics() {
    use support::metrics::scrape;
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &fake_jwt("counted", "one")).await;
    tx.send(request(&["default", "ROOTCA"], None))
        .await
        .unwrap();
    let first = next(&mut inbound, "served", &agent).await;
    tx.send(nack(&["default", "ROOTCA"], &first)).await.unwrap();
    tx.send(request(&["ROOTCA"], Some(&first))).await.unwrap();
    let second = next(&mut inbound, "the change after the NACK", &agent).await;
    assert_eq!(names_of(&second), ["ROOTCA"]);
    let err = fetch(&mut client, &["bogus"], &fake_jwt("counted", "one"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = fetch(&mut client, &["default"], "garbage")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let m = scrape(&agent.status_url("/metrics"), "prometheus").await;
    assert_eq!(m.get("node_agent_sds_streams_open", &[]), 1.0);
    let pushes = |r: &str| m.get("node_agent_sds_pushes_total", &[("resource", r)]);
    assert_eq!((pushes("default"), pushes("ROOTCA")), (1.0, 2.0));
    assert_eq!(m.get("node_agent_sds_nacks_total", &[]), 1.0);
    let refused = |r: &str| m.get("node_agent_sds_requests_refused_total", &[("reason", r)]);
    assert_eq!(refused("invalid_request"), 1.0);
    assert_eq!(refused("credential"), 1.0);
    assert_eq!(refused("limits"), 0.0);
    drop((tx, inbound));
}

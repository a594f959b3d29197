//! The status server's endpoints: their answers in each state; readiness
//! that follows the SDS socket (the status server starts first, then SDS,
//! then SDS stops) and survives a stopped Vault while cached certificates are
//! served. The server's bounds are in `held.rs`.

use crate::support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::agent::Agent;
use support::metrics::scrape;
use support::sds_client::*;
use support::vault_env::VaultEnv;

use super::{get, identities_page, local_agent, metrics_when, SPIFFE_A};

#[tokio::test]
async fn endpoints_answer_in_each_state() {
    let agent = local_agent(&[]);
    let url = |p: &str| agent.status_url(p);

    assert_eq!(get(&url("/healthz/live")).await, (200, "live\n".into()));
    let (code, body) = get(&url("/healthz/ready")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&agent.socket.display().to_string()), "{body}");

    // Before any workload: the families exist, at zero, in both formats.
    let before = scrape(&url("/metrics"), "openmetrics").await;
    let classic = scrape(&url("/metrics"), "prometheus").await;
    for s in [&before, &classic] {
        assert_eq!(s.families["node_agent_ca_requests"], "counter");
        assert_eq!(s.families["node_agent_sds_streams_open"], "gauge");
        assert_eq!(s.families["node_agent_identities_cached"], "gauge");
        assert_eq!(
            s.get(
                "node_agent_ca_requests_total",
                &[("kind", "sign"), ("outcome", "ok")]
            ),
            0.0
        );
        assert_eq!(s.get("node_agent_identities_cached", &[]), 0.0);
    }
    let page = identities_page(&agent).await;
    assert_eq!(page["identities_cached"], 0, "{page}");
    assert_eq!(page["identities"], serde_json::json!([]), "{page}");
    // The trust bundle's read of the CA's roots at start is a `roots` request.
    metrics_when(&agent, "the roots read at start", |m| {
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "roots"), ("outcome", "ok")],
        ) >= 1.0
    })
    .await;
    assert_eq!(before.families["node_agent_build"], "info");
    assert_eq!(
        before.get(
            "node_agent_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // One workload served: one sign, one identity.
    let mut client = connect(&agent.socket).await;
    fetch(&mut client, &["default"], &fake_jwt("default", "httpbin"))
        .await
        .expect("served");
    let after = scrape(&url("/metrics"), "openmetrics").await;
    assert_eq!(
        after.families["node_agent_ca_request_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        after.get(
            "node_agent_ca_requests_total",
            &[("kind", "sign"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        after.get(
            "node_agent_ca_request_duration_seconds_count",
            &[("kind", "sign"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        after.get(
            "node_agent_ca_requests_total",
            &[("kind", "login"), ("outcome", "ok")]
        ),
        0.0,
        "the local CA answers logins from its cache: no CA request"
    );
    assert_eq!(after.get("node_agent_identities_cached", &[]), 1.0);
    let page = identities_page(&agent).await;
    assert_eq!(page["identities_cached"], 1, "{page}");
    assert_eq!(page["identities"][0]["identity"], SPIFFE_A, "{page}");
    assert_eq!(
        page["identities"][0]["streams_open"], 0,
        "a FetchSecrets call watches only while it is answered"
    );

    // What is not served.
    assert_eq!(get(&url("/nope")).await.0, 404);
    let post = reqwest::Client::new()
        .post(url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD");

    // The socket goes away (removed under the agent): not ready, with the
    // reason; still live.
    std::fs::remove_file(&agent.socket).unwrap();
    let (code, body) = get(&url("/healthz/ready")).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("not ready: ") && body.contains("cannot connect"),
        "{body}"
    );
    assert!(body.contains(&agent.socket.display().to_string()), "{body}");
    assert_eq!(get(&url("/healthz/live")).await.0, 200);
}

/// In-process, so that the moment before the SDS socket serves can be
/// observed: the status server starts first, then SDS, then SDS stops.
#[tokio::test]
async fn ready_only_while_the_sds_socket_serves() {
    use node_agent::ca::local::LocalCa;
    use node_agent::crypto::KeyType;
    use node_agent::secrets::{ManagerOptions, SecretManager};
    use node_agent::status::{start, StatusState};

    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("sds.sock");
    let ca = Arc::new(LocalCa::new(None, "cluster.local").unwrap());
    let trust = node_agent::trust::TrustBundle::start(ca.clone(), Default::default()).unwrap();
    let manager = SecretManager::new(
        ca,
        trust,
        ManagerOptions::new("cluster.local", KeyType::EcP256, Duration::from_secs(3600)),
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    let status = start(
        "127.0.0.1:0".parse().unwrap(),
        StatusState {
            sds_socket: socket.clone(),
            report: manager.clone(),
            limits: Default::default(),
            debug_from: Default::default(),
        },
        rx.clone(),
    )
    .await
    .unwrap();
    let ready = format!("http://{}/healthz/ready", status.local_addr);

    let (code, body) = get(&ready).await;
    assert_eq!(code, 503, "before the socket exists: {body}");
    assert!(body.contains("cannot connect"), "{body}");

    let listener = node_agent::endpoint::socket::bind(&socket, Default::default()).unwrap();
    let (sds_tx, sds_rx) = tokio::sync::watch::channel(false);
    let sds = tokio::spawn(node_agent::sds::serve(
        listener,
        manager.clone(),
        None,
        sds_rx,
    ));
    let (code, body) = get(&ready).await;
    assert_eq!(code, 200, "once SDS serves: {body}");

    sds_tx.send(true).unwrap();
    sds.await.unwrap().unwrap();
    let (code, body) = get(&ready).await;
    assert_eq!(code, 503, "once SDS stopped: {body}");

    // The server stops with the agent.
    tx.send(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reqwest::Client::new()
        .get(&ready)
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "status server still answering");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Vault stops: cached certificates are still served, so the agent stays
/// ready, while a new identity is refused and the metrics show why.
#[tokio::test]
async fn readiness_survives_a_stopped_vault() {
    let mut env = VaultEnv::start().await;
    let agent = Agent::start(&env.agent_env());
    let mut client = connect(&agent.socket).await;
    let httpbin = env.jwt("default", "httpbin");
    let first = fetch(&mut client, &["default"], &httpbin)
        .await
        .expect("served while Vault runs");
    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    assert_eq!(
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "login"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "sign"), ("outcome", "ok")]
        ),
        1.0
    );

    env.bao.stop();
    // Positive control: Vault really is gone for the agent.
    let refused = fetch(&mut client, &["default"], &env.jwt("default", "sleep"))
        .await
        .expect_err("a new identity needs Vault");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    assert!(
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "login"), ("outcome", "unavailable")]
        ) >= 1.0,
        "{}",
        m.text
    );

    let (code, body) = get(&agent.status_url("/healthz/ready")).await;
    assert_eq!(code, 200, "{body}");
    let again = fetch(&mut client, &["default"], &httpbin)
        .await
        .expect("the cached certificate is still served");
    assert_eq!(
        tls_certificate(&secrets(&again)[0]),
        tls_certificate(&secrets(&first)[0])
    );
}

//! The status server and the logs: each endpoint's answers in each state,
//! the metrics as a Prometheus parser reads them, readiness through a Vault
//! outage, a rotation in the counters, and JSON log lines.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::agent::Agent;
use support::metrics::{parse, scrape, Scrape};
use support::sds_client::*;
use support::vault_env::VaultEnv;

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap())
}

fn local_agent(extra: &[(&'static str, &str)]) -> Agent {
    let mut env = vec![("CA_PROVIDER", "LocalCA".to_string())];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    Agent::start(&env)
}

const SPIFFE_A: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

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
        },
        rx.clone(),
    )
    .await
    .unwrap();
    let ready = format!("http://{}/healthz/ready", status.local_addr);

    let (code, body) = get(&ready).await;
    assert_eq!(code, 503, "before the socket exists: {body}");
    assert!(body.contains("cannot connect"), "{body}");

    let listener = node_agent::sds::uds::bind(&socket).unwrap();
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

/// A short-lived certificate renews on an open stream; the counters show it.
#[tokio::test]
async fn a_rotation_shows_in_the_counters() {
    let agent = local_agent(&[
        ("SECRET_TTL", "2s"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
    ]);
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &fake_jwt("default", "httpbin")).await;
    tx.send(request(&["default"], None)).await.unwrap();
    let first = next_within(&mut inbound, Duration::from_secs(10), "first", || {
        agent.log()
    })
    .await
    .unwrap();
    tx.send(request(&["default"], Some(&first))).await.unwrap();
    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    let signs = |m: &Scrape| {
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "sign"), ("outcome", "ok")],
        )
    };
    assert_eq!(signs(&m), 1.0, "one sign before the rotation");

    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(10),
        "the renewed certificate",
        || agent.log(),
    )
    .await
    .unwrap();
    assert_ne!(
        tls_certificate(&secrets(&pushed)[0]).0,
        tls_certificate(&secrets(&first)[0]).0
    );
    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    assert!(signs(&m) >= 2.0, "{}", m.text);
    // TODO(issue 11, phase 2): node_agent_rotations_total, pushes by resource,
    // streams open and the identity's expiry, once src/secrets and src/sds
    // record them.
}

/// `LOG_FORMAT=json`: every line of a run is one JSON object with a
/// timestamp, a level and a message, and the fields beside them.
#[tokio::test]
async fn json_logs_one_object_per_line() {
    let mut agent = local_agent(&[("LOG_FORMAT", "json")]);
    let jwt = fake_jwt("default", "httpbin");
    let mut client = connect(&agent.socket).await;
    fetch(&mut client, &["default"], &jwt)
        .await
        .expect("served");
    let refused = fetch(&mut client, &["default"], "not-a-jwt")
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    // SIGTERM while the client's connection is open: waited for off the
    // runtime that drives that connection, so that it can close.
    let (st, agent) = tokio::task::spawn_blocking(move || (agent.terminate(), agent))
        .await
        .unwrap();
    assert!(st.success(), "{}", agent.log());
    drop(client);

    let log = agent.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v.is_object(), "{l}");
            let ts = v["timestamp"]
                .as_str()
                .unwrap_or_else(|| panic!("no timestamp: {l}"));
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("timestamp {ts:?} is not RFC 3339 ({e}): {l}"));
            let level = v["level"]
                .as_str()
                .unwrap_or_else(|| panic!("no level: {l}"));
            assert!(
                ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
                "{l}"
            );
            assert!(
                v["message"].as_str().is_some_and(|m| !m.is_empty()),
                "no message: {l}"
            );
            assert!(!l.contains(&jwt), "a JWT reached the log: {l}");
            v
        })
        .collect();
    let find = |what: &str| {
        lines
            .iter()
            .find(|v| v["message"].as_str().unwrap().starts_with(what))
            .unwrap_or_else(|| panic!("no line {what:?} in\n{log}"))
    };
    assert!(lines.len() >= 5, "{log}");
    find("SDS gRPC server start");
    assert_eq!(find("issued workload certificate")["identity"], SPIFFE_A);
    assert_eq!(find("refusing FetchSecrets")["level"], "WARN");
    assert!(find("status server listening")["addr"].is_string());
    assert_eq!(
        lines.last().unwrap()["message"],
        "SDS server stopped",
        "{log}"
    );

    // The default stays the human format.
    let mut text = local_agent(&[]);
    assert!(text.terminate().success());
    let first = text.log().lines().next().unwrap().to_string();
    assert!(serde_json::from_str::<Value>(&first).is_err(), "{first}");
}

/// Bad or unusable settings of this module stop the agent with a message
/// naming them.
#[tokio::test]
async fn bad_status_and_log_settings_stop_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sock");
    let cases = [
        (
            "LOG_FORMAT",
            "yaml".to_string(),
            2,
            "invalid setting LOG_FORMAT=\"yaml\"",
        ),
        (
            "STATUS_ADDR",
            "15020".to_string(),
            2,
            "invalid setting STATUS_ADDR=\"15020\"",
        ),
    ];
    for (var, value, code, message) in cases {
        let mut a = Agent::spawn(
            &socket,
            dir.path(),
            &[("CA_PROVIDER", "LocalCA".into()), (var, value)],
        );
        let st = a.wait_exit(Duration::from_secs(15));
        assert_eq!(st.code(), Some(code), "{}", a.log());
        assert!(a.log().contains(message), "{}", a.log());
    }
    // The flag wins over the variable and is checked the same way.
    let mut a = Agent::spawn_args(
        &socket,
        dir.path(),
        &[("CA_PROVIDER", "LocalCA".into())],
        &["--status-addr", "nowhere"],
    );
    assert_eq!(a.wait_exit(Duration::from_secs(15)).code(), Some(2));
    assert!(
        a.log()
            .contains("invalid setting --status-addr=\"nowhere\""),
        "{}",
        a.log()
    );

    // The port is taken: the agent says which setting to change.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut a = Agent::spawn(
        &socket,
        dir.path(),
        &[
            ("CA_PROVIDER", "LocalCA".into()),
            ("STATUS_ADDR", addr.clone()),
        ],
    );
    assert_eq!(a.wait_exit(Duration::from_secs(15)).code(), Some(1));
    assert!(
        a.log()
            .contains(&format!("cannot listen on STATUS_ADDR {addr}")),
        "{}",
        a.log()
    );
    assert!(!socket.exists(), "no SDS socket left behind");

    // Empty turns it off: the agent serves SDS without it.
    let a = local_agent(&[("STATUS_ADDR", "")]);
    assert!(a.log().contains("status server off"), "{}", a.log());
}

/// The parser really is strict: a malformed exposition is refused.
#[tokio::test]
#[should_panic(expected = "parser refused")]
async fn the_metrics_parser_refuses_malformed_text() {
    parse(
        "# TYPE x counter\nx_total{a=\"1\" 1\n# EOF\n",
        "openmetrics",
    )
    .await;
}

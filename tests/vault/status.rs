//! The status server and the logs: each endpoint's answers in each state,
//! the metrics as a Prometheus parser reads them, readiness through a Vault
//! outage, a rotation in the counters, and JSON log lines.

use crate::support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::Method;

use serde_json::Value;
use support::agent::Agent;
use support::bao::ProxyMode;
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
        },
        rx.clone(),
    )
    .await
    .unwrap();
    let ready = format!("http://{}/healthz/ready", status.local_addr);

    let (code, body) = get(&ready).await;
    assert_eq!(code, 503, "before the socket exists: {body}");
    assert!(body.contains("cannot connect"), "{body}");

    let listener = node_agent::endpoint::socket::bind(&socket).unwrap();
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

/// A renewal on open streams, as Envoy opens them (one for `default`, one
/// for `ROOTCA`), seen in the counters: one rotation, a push of `default`
/// only, the expiry gauges moving to the new certificate, and the streams.
#[tokio::test]
async fn a_rotation_shows_in_the_counters() {
    let agent = local_agent(&[
        ("SECRET_TTL", "8s"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
    ]);
    let log = || agent.log();
    let jwt = fake_jwt("default", "httpbin");
    let mut client = connect(&agent.socket).await;
    let (cert_tx, mut certs) = open_stream(&mut client, &jwt).await;
    let (root_tx, mut roots) = open_stream(&mut client, &jwt).await;
    cert_tx.send(request(&["default"], None)).await.unwrap();
    let first = next_within(&mut certs, Duration::from_secs(10), "default", log)
        .await
        .unwrap();
    cert_tx
        .send(request(&["default"], Some(&first)))
        .await
        .unwrap();
    root_tx.send(request(&["ROOTCA"], None)).await.unwrap();
    let root = next_within(&mut roots, Duration::from_secs(10), "ROOTCA", log)
        .await
        .unwrap();
    root_tx
        .send(request(&["ROOTCA"], Some(&root)))
        .await
        .unwrap();
    let (_, serial_1, not_after_1) = leaf_of(&first);

    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    assert_eq!(m.get("node_agent_rotations_total", &[]), 0.0);
    assert_eq!(pushes(&m), (1.0, 1.0), "one push of each resource");
    assert_eq!(m.get("node_agent_sds_streams_open", &[]), 2.0);
    assert_eq!(m.get("node_agent_identities_cached", &[]), 1.0);
    assert_eq!(signs(&m), 1.0);
    assert_eq!(expiry(&m), unix(not_after_1));
    let left = m.get(
        "node_agent_certificate_expires_in_seconds",
        &[("identity", SPIFFE_A)],
    );
    assert!(left > 0.0 && left <= 8.0, "{left}");
    // Every metric docs/status.md's table lists exists, and no other.
    assert_eq!(exposed(&m), readme_metrics());

    // The renewal (at half of the 8 s): pushed on the `default` stream.
    let renewed = next_within(&mut certs, Duration::from_secs(15), "the renewal", log)
        .await
        .unwrap();
    cert_tx
        .send(request(&["default"], Some(&renewed)))
        .await
        .unwrap();
    let (_, serial_2, not_after_2) = leaf_of(&renewed);
    assert_ne!(serial_2, serial_1);
    assert!(not_after_2 > not_after_1);
    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    assert_eq!(m.get("node_agent_rotations_total", &[]), 1.0, "{}", log());
    assert_eq!(
        pushes(&m),
        (2.0, 1.0),
        "the new certificate, on its stream only (the roots did not change)"
    );
    assert_eq!(signs(&m), 2.0);
    assert_eq!(expiry(&m), unix(not_after_2), "the new certificate's");
    assert_eq!(m.get("node_agent_sds_streams_open", &[]), 2.0);
    let page = identities_page(&agent).await;
    assert_eq!(page["identities"][0]["serial"], serial_2.as_str());

    // The streams close: the gauges follow.
    drop((cert_tx, certs, root_tx, roots));
    let page = page_when(&agent, "the streams closed", |p| {
        p["identities"][0]["streams_open"] == 0
    })
    .await;
    assert_eq!(page["identities_cached"], 1, "cached until evicted");
    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    assert_eq!(m.get("node_agent_sds_streams_open", &[]), 0.0);
}

/// `/debug/identities` in each state, against OpenBao: empty, one identity
/// with its certificate and schedule, a renewal failing while Vault is away
/// (its error shown, the certificate still served), the renewal once Vault
/// is back (the error gone), and a renewal whose token Vault revoked (one
/// CA retry). The counters agree with Vault's audit log: every request that
/// reached Vault is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_identities_in_each_state_and_counters_that_match_vault() {
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Up).await;
    let proxy = env.proxy.as_ref().unwrap();
    let agent = Agent::started(&env.agent_env_with(&[
        ("SECRET_TTL", "12s"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
    ]))
    .await;
    let log = || agent.log();

    let page = identities_page(&agent).await;
    assert_eq!(page["identities_cached"], 0, "{page}");
    assert_eq!(page["ca_queue_depth"], 0, "{page}");
    assert_eq!(page["identities"], serde_json::json!([]), "{page}");

    // One identity, its stream open.
    let jwt = env.jwt("default", "httpbin");
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
    tx.send(request(&["default"], None)).await.unwrap();
    let first = next_within(&mut inbound, Duration::from_secs(20), "served", log)
        .await
        .unwrap();
    tx.send(request(&["default"], Some(&first))).await.unwrap();
    let (key_pem, serial_1, not_after_1) = leaf_of(&first);
    let page = page_when(&agent, "the renewal scheduled", |p| {
        p["identities"][0]["renew_at"].is_string()
    })
    .await;
    assert_eq!(page["identities_cached"], 1, "{page}");
    let id = &page["identities"][0];
    assert_eq!(id["identity"], SPIFFE_A, "{page}");
    assert_eq!(id["key_type"], "ec-p256");
    assert_eq!(id["serial"], serial_1.as_str());
    assert_eq!(time_of(&id["not_after"]), unix(not_after_1));
    let renew_at = time_of(&id["renew_at"]);
    let now = unix(SystemTime::now());
    assert!(
        renew_at > now && renew_at < unix(not_after_1),
        "renews before expiry: {page}"
    );
    assert_eq!(id["streams_open"], 1);
    assert_eq!(id["last_error"], Value::Null);
    let text = page.to_string();
    assert!(!text.contains(&jwt), "the JWT is not on the page");
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!text.contains(line), "the key is not on the page");
    }

    // Vault away when the renewal is due: it fails, the page says why, the
    // certificate is still served, and the renewal is tried again.
    proxy.set_up(false).await;
    let page = page_when(&agent, "the failed renewal", |p| {
        p["identities"][0]["last_error"].is_string()
    })
    .await;
    let id = &page["identities"][0];
    let error = id["last_error"].as_str().unwrap();
    assert!(error.contains("could not sign"), "{error}");
    assert_eq!(
        id["serial"],
        serial_1.as_str(),
        "still the first certificate"
    );
    assert!(time_of(&id["renew_at"]) >= unix(SystemTime::now()) - 1.0);
    let m = metrics_when(&agent, "a retried renewal", |m| {
        m.get("node_agent_retries_total", &[("operation", "renewal")]) >= 1.0
    })
    .await;
    assert!(
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "sign"), ("outcome", "unavailable")]
        ) >= 2.0,
        "the failed attempt and its retry"
    );
    assert_eq!(m.get("node_agent_rotations_total", &[]), 0.0);
    assert_eq!(get(&agent.status_url("/healthz/ready")).await.0, 200);

    // Vault back: the renewal goes through and the error is gone.
    proxy.set_up(true).await;
    let renewed = next_within(&mut inbound, Duration::from_secs(30), "the renewal", log)
        .await
        .unwrap();
    tx.send(request(&["default"], Some(&renewed)))
        .await
        .unwrap();
    let (_, serial_2, _) = leaf_of(&renewed);
    let page = identities_page(&agent).await;
    let id = &page["identities"][0];
    assert_eq!(id["serial"], serial_2.as_str(), "{page}");
    assert_eq!(id["last_error"], Value::Null, "{page}");
    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    assert_eq!(m.get("node_agent_rotations_total", &[]), 1.0);
    assert_eq!(
        m.get("node_agent_retries_total", &[("operation", "ca_request")]),
        0.0
    );

    // Vault revokes the agent's tokens: the next renewal's sign is refused,
    // the agent logs in again and signs once more.
    env.bao
        .root(
            Method::POST,
            "sys/leases/revoke-prefix/auth/kubernetes",
            None,
        )
        .await
        .unwrap();
    let renewed = next_within(&mut inbound, Duration::from_secs(30), "a renewal", log)
        .await
        .unwrap();
    tx.send(request(&["default"], Some(&renewed)))
        .await
        .unwrap();
    let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
    assert_eq!(m.get("node_agent_rotations_total", &[]), 2.0, "{}", log());
    assert_eq!(
        m.get("node_agent_retries_total", &[("operation", "ca_request")]),
        1.0,
        "{}",
        log()
    );
    assert_eq!(
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "sign"), ("outcome", "rejected")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "login"), ("outcome", "ok")]
        ),
        2.0,
        "the first login and the one after the revocation"
    );

    // Every request that reached Vault was counted once, and only those
    // (the ones sent while Vault was away never reached it).
    for (kind, path) in [
        ("login", "auth/kubernetes/login"),
        ("sign", "istio_ca/sign/istio-pki-role"),
        // The issuer list (each new issuer's certificate is read with it).
        ("roots", "istio_ca/issuers/"),
    ] {
        let audited = env.count(path);
        let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
        let reached: f64 = ["ok", "rejected", "bad_answer"]
            .iter()
            .map(|o| {
                m.get(
                    "node_agent_ca_requests_total",
                    &[("kind", kind), ("outcome", o)],
                )
            })
            .sum();
        assert!(audited >= 1, "{kind}: {path} was asked");
        assert_eq!(
            reached, audited as f64,
            "{kind}: counted vs audited\n{}",
            m.text
        );
        assert_eq!(env.count(path), audited, "{kind}: nothing new meanwhile");
    }
}

/// The status server's bounds are settings: past STATUS_MAX_CONNECTIONS a
/// connection is closed unanswered, a connection gets STATUS_HEADER_TIMEOUT
/// to send a request head and lives STATUS_CONNECTION_LIFETIME at most.
#[tokio::test]
async fn the_status_servers_bounds_are_settings() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let agent = local_agent(&[
        ("STATUS_MAX_CONNECTIONS", "2"),
        ("STATUS_HEADER_TIMEOUT", "1s"),
        ("STATUS_CONNECTION_LIFETIME", "3s"),
    ]);
    let addr = agent.status_addr.clone();
    const GET: &[u8] = b"GET /healthz/live HTTP/1.1\r\nHost: status\r\n\r\n";

    // Two silent connections hold both places: a third is closed at once,
    // unanswered.
    let opened = Instant::now();
    let mut a = TcpStream::connect(&addr).await.unwrap();
    let _b = TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(&addr).await.unwrap();
    c.write_all(GET).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_millis(700), c.read_to_end(&mut answer))
        .await
        .expect("closed at once, before the others' head time-out")
        .ok();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    // The silent ones are closed after STATUS_HEADER_TIMEOUT (not the
    // default 5 s, nor at the end of their 3 s lifetime); then a new
    // connection is served.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), a.read_to_end(&mut rest))
        .await
        .expect("a silent connection is closed")
        .ok();
    let silent_for = opened.elapsed();
    assert!(
        silent_for >= Duration::from_millis(950) && silent_for < Duration::from_millis(2500),
        "{silent_for:?}"
    );
    let (code, _) = get(&agent.status_url("/healthz/live")).await;
    assert_eq!(code, 200);

    // A connection that keeps asking is closed after STATUS_CONNECTION_LIFETIME.
    let mut d = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let mut answered = 0;
    let mut buf = [0u8; 4096];
    let lifetime = loop {
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
        if d.write_all(GET).await.is_err() {
            break started.elapsed();
        }
        match tokio::time::timeout(Duration::from_secs(3), d.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => {
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
                answered += 1;
            }
            Err(_) => panic!("no answer"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(answered >= 6, "kept alive: {answered} answers");
    assert!(
        lifetime >= Duration::from_millis(2900) && lifetime < Duration::from_secs(8),
        "{lifetime:?}"
    );
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

/// Key PEM, serial and NotAfter of the `default` certificate a response carries.
fn leaf_of(
    resp: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> (String, String, SystemTime) {
    let (chain, key) = tls_certificate(&secrets(resp)[0]);
    let (_, serial, not_after) = node_agent::crypto::cert_summary(&chain).unwrap();
    (key, serial, not_after)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as f64
}

/// A time of the page (RFC 3339) in Unix seconds.
fn time_of(v: &Value) -> f64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
        .unix_timestamp() as f64
}

fn signs(m: &Scrape) -> f64 {
    m.get(
        "node_agent_ca_requests_total",
        &[("kind", "sign"), ("outcome", "ok")],
    )
}

/// Pushes of (`default`, `ROOTCA`).
fn pushes(m: &Scrape) -> (f64, f64) {
    let p = |r| m.get("node_agent_sds_pushes_total", &[("resource", r)]);
    (p("default"), p("ROOTCA"))
}

fn expiry(m: &Scrape) -> f64 {
    m.get(
        "node_agent_certificate_expiry_timestamp_seconds",
        &[("identity", SPIFFE_A)],
    )
}

/// `/debug/identities`, parsed.
async fn identities_page(agent: &Agent) -> Value {
    let (code, body) = get(&agent.status_url("/debug/identities")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The page once `ready` holds; panics after 30 s saying `what`.
async fn page_when(agent: &Agent, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = identities_page(agent).await;
        if ready(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not on the page\n{page:#}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The metrics once `ready` holds; panics after 30 s saying `what`.
async fn metrics_when(agent: &Agent, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = scrape(&agent.status_url("/metrics"), "openmetrics").await;
        if ready(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not in the metrics\n{}\n{}",
            m.text,
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The names the metrics table of docs/status.md lists.
fn readme_metrics() -> BTreeSet<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/status.md")).unwrap();
    let section = doc
        .split("\n### Metrics\n")
        .nth(1)
        .expect("docs/status.md has a Metrics section")
        .split("\n## ")
        .next()
        .unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `node_agent_"))
        .map(|rest| format!("node_agent_{}", rest.split('`').next().unwrap()))
        .collect()
}

/// The metric names an exposition shows, as they are written: counters with
/// `_total`, info metrics with `_info`.
fn exposed(m: &Scrape) -> BTreeSet<String> {
    m.families
        .iter()
        .map(|(name, ty)| match ty.as_str() {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.clone(),
        })
        .collect()
}

//! What the counters and `/debug/identities` show, against OpenBao: a renewal
//! on open streams (one rotation, a push of `default` only, the expiry gauges
//! moving), each identity's certificate, schedule and error through a Vault
//! outage and a revoked token, matching what Vault counted; every metric the
//! README lists is exposed; and the Prometheus parser used is strict.

use crate::support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use reqwest::Method;

use serde_json::Value;
use support::agent::Agent;
use support::bao::ProxyMode;
use support::metrics::{parse, scrape, Scrape};
use support::sds_client::*;
use support::vault_env::VaultEnv;

use super::{
    expiry, get, identities_page, local_agent, metrics_when, pushes, signs, time_of, unix, SPIFFE_A,
};

/// A renewal on open streams, as Envoy opens them (one for `default`, one
/// for `ROOTCA`), seen in the counters: one rotation, a push of `default`
/// only, the expiry gauges moving to the new certificate, and the streams.
#[tokio::test]
async fn a_rotation_shows_in_the_counters() {
    // One federated trust domain (from a file), so that its series exist.
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let roots = dir.path().join("partner.pem");
    std::fs::write(&roots, ca.self_signed(&key).unwrap().pem()).unwrap();
    let federation = dir.path().join("federation.json");
    std::fs::write(
        &federation,
        serde_json::json!({"trust_domains": {"partner.example": {"bundle_file": roots}}})
            .to_string(),
    )
    .unwrap();
    let agent = local_agent(&[
        ("SECRET_TTL", "8s"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
        ("FEDERATION_CONFIG", federation.to_str().unwrap()),
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
/// is back (the error gone), and a renewal after Vault revoked the agent's
/// tokens (the renewal proves the JWT anew, so nothing is refused). The
/// counters agree with Vault's audit log: every request that reached Vault
/// is counted once.
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
    // The renewal proves the stream's JWT first: the login finds Vault away.
    assert!(
        error.contains("failed to login Vault") && error.contains("cannot connect"),
        "{error}"
    );
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
            &[("kind", "login"), ("outcome", "unavailable")]
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

    // Vault revokes the agent's tokens: the next renewal proves the JWT
    // anew, so its sign uses a new token; nothing is refused or retried.
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
        0.0,
        "{}",
        log()
    );
    assert_eq!(
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "sign"), ("outcome", "rejected")]
        ),
        0.0
    );
    assert_eq!(
        m.get(
            "node_agent_ca_requests_total",
            &[("kind", "login"), ("outcome", "ok")]
        ),
        3.0,
        "the first login and one at each of the two renewals"
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
        .filter_map(|l| l.strip_prefix("| `"))
        .filter(|rest| rest.starts_with("node_agent_") || rest.starts_with("process_"))
        .map(|rest| rest.split('`').next().unwrap().to_string())
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

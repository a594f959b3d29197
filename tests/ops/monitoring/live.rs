//! The shipped rules and dashboard against the real thing: a real Prometheus
//! scraping a real node-agent that gets 40 s certificates from a real
//! OpenBao, with the rules file of deploy/monitoring/ as it is (no duration
//! rewritten: the renewal alert fires in real time from the metric).
//!
//! Prometheus scrapes the agent as a cluster's does, over a non-loopback
//! address (this machine's own, e.g. eth0's, the agent listening on every
//! interface), with the default STATUS_DEBUG_FROM: so it gets none of the
//! series labelled with an identity, which the test checks, and the alerts
//! and panels work without them.
//!
//! Vault is taken away (a proxy in front of it refuses connections) before
//! the certificate falls due for renewal at a tenth of its life; the renewal
//! alert must fire before the certificate expires, the alerts that wait
//! minutes before firing must be pending on the real series, and once Vault
//! is back and the certificate renewed the alert resolves. Then every
//! dashboard query and every series the rules name returns data from that
//! Prometheus.

use crate::support;

use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use serde_json::Value;
use support::agent::Agent;
use support::bao::ProxyMode;
use support::manifests::repo;
use support::metrics::scrape;
use support::net::non_loopback_ipv4;
use support::sds_client::*;
use support::vault_env::VaultEnv;

use super::prometheus::Prometheus;
use super::{alerting_rules, dashboard_panels, read, rule_groups};

const JOB: &str = "node-agent";
const SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
const OVERDUE: &str = "NodeAgentCertificateRenewalOverdue";
/// The alerts the outage and the refused request start, which wait minutes
/// before firing: pending while the test runs.
const PENDING: &[&str] = &[
    "NodeAgentVaultUnavailable",
    "NodeAgentTrustBundleRefreshFailing",
    "NodeAgentRequestsRefusedByLimits",
];

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Serial and not-after of a response's `default` certificate.
fn leaf(resp: &DiscoveryResponse) -> (String, SystemTime) {
    let (chain, _) = tls_certificate(&secrets(resp)[0]);
    let (_, serial, not_after) = node_agent::crypto::cert_summary(&chain).unwrap();
    (serial, not_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_renewal_alert_fires_before_expiry_and_every_panel_returns_data() {
    let started = Instant::now();
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Up).await;
    let proxy = env.proxy.as_ref().unwrap();
    let port = support::ports::free_port();
    let everywhere = format!("0.0.0.0:{port}");
    // The address Prometheus scrapes: not loopback, so not in the default
    // STATUS_DEBUG_FROM.
    let target = format!("{}:{port}", non_loopback_ipv4());
    let loopback = format!("http://127.0.0.1:{port}/metrics");
    // A federated trust domain (its roots from a file: the tutorial's root
    // stands in), so that the federation series exist.
    let fed_dir = tempfile::tempdir().unwrap();
    let roots = fed_dir.path().join("partner.pem");
    std::fs::write(&roots, &env.setup.root_pem).unwrap();
    let federation = fed_dir.path().join("federation.json");
    std::fs::write(
        &federation,
        serde_json::json!({"trust_domains": {"partner.example": {"bundle_file": roots}}})
            .to_string(),
    )
    .unwrap();
    let agent = Agent::started(&env.agent_env_with(&[
        ("FEDERATION_CONFIG", federation.to_str().unwrap()),
        ("STATUS_ADDR", &everywhere),
        ("SECRET_TTL", "40s"),
        ("SECRET_GRACE_PERIOD_RATIO", "0.9"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
        ("TRUST_REFRESH_INTERVAL", "2s"),
        ("SDS_MAX_STREAMS", "1"),
    ]))
    .await;
    let log = || agent.log();
    let rules = repo().join("deploy/monitoring/node-agent.rules.yaml");
    let prom = Prometheus::start(JOB, &[&target], &rules).await;
    // Scraped once before anything happens, so that every counter's rise shows.
    prom.has_data("node_agent_build_info").await;

    // One identity, held by a stream.
    let jwt = env.jwt("default", "httpbin");
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
    tx.send(request(&["default"], None)).await.unwrap();
    let first = next_within(&mut inbound, Duration::from_secs(20), "served", log)
        .await
        .unwrap();
    tx.send(request(&["default"], Some(&first))).await.unwrap();
    // Vault goes away before the renewal falls due, 4 s from now.
    proxy.set_mode(ProxyMode::Down).await;
    let (serial_1, not_after) = leaf(&first);

    // A client refused at a limit: the stream holds the only place.
    let refused = fetch(&mut client, &["default"], &jwt)
        .await
        .expect_err("SDS_MAX_STREAMS=1 is taken");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );

    // Over loopback the agent names the identity (the per-identity series);
    // Prometheus, on the other address, is not shown them.
    let m = scrape(&loopback, "prometheus").await;
    let due = m.get(
        "node_agent_certificate_renewal_timestamp_seconds",
        &[("identity", SPIFFE_ID)],
    );
    assert!(
        due < unix(not_after) - 30.0,
        "renewal at a tenth of the life: {due}"
    );

    let alerts = prom
        .alerts_when("the renewal alert firing", Duration::from_secs(60), |a| {
            a.iter().any(|a| a.name == OVERDUE && a.state == "firing")
        })
        .await;
    let seen = SystemTime::now();
    assert!(
        seen + Duration::from_secs(5) < not_after,
        "fired only {:?} before the expiry",
        not_after.duration_since(seen).unwrap_or_default()
    );
    let overdue = alerts.iter().find(|a| a.name == OVERDUE).unwrap();
    assert!(overdue.labels.get("identity").is_none(), "{overdue:?}");
    assert_eq!(overdue.labels["job"], JOB, "{overdue:?}");
    assert_eq!(overdue.labels["instance"], target.as_str());
    no_series_names_an_identity(&prom, &loopback).await;
    // Not before the margin (its 20 s floor for this certificate), give or
    // take a scrape and an evaluation.
    let active = unix(overdue.active_at);
    assert!(active >= due + 18.0, "active at {active}, due at {due}");
    for name in PENDING {
        assert!(
            alerts
                .iter()
                .any(|a| a.name == *name && a.state == "pending"),
            "{name} not pending: {alerts:#?}"
        );
    }
    assert!(
        !alerts
            .iter()
            .any(|a| a.name == "NodeAgentCertificateExpired"),
        "{alerts:#?}"
    );

    // Vault is back: the certificate is renewed (pushed on the stream) and
    // the alert resolves.
    proxy.set_mode(ProxyMode::Up).await;
    let renewed = next_within(&mut inbound, Duration::from_secs(30), "the renewal", log)
        .await
        .unwrap();
    tx.send(request(&["default"], Some(&renewed)))
        .await
        .unwrap();
    let (serial_2, not_after_2) = leaf(&renewed);
    assert_ne!(serial_2, serial_1);
    assert!(not_after_2 > not_after);
    prom.alerts_when("the renewal alert resolved", Duration::from_secs(20), |a| {
        !a.iter().any(|a| a.name == OVERDUE)
    })
    .await;

    every_panel_returns_data(&prom, &target).await;
    every_series_the_rules_name_exists(&prom).await;
    eprintln!(
        "monitoring against the real thing: {:?}; the renewal alert fired {:?} after the renewal time, {:?} before the expiry",
        started.elapsed(),
        Duration::from_secs_f64(active - due),
        not_after.duration_since(seen).unwrap_or_default()
    );
}

/// Prometheus holds no series labelled with an identity, nor any naming
/// one, although the agent has them (it shows them over loopback): the
/// restriction of STATUS_DEBUG_FROM is what the alerts fired under.
async fn no_series_names_an_identity(prom: &Prometheus, loopback: &str) {
    let m = scrape(loopback, "prometheus").await;
    assert!(
        m.text.contains(&format!("identity=\"{SPIFFE_ID}\"")),
        "over loopback the agent names the identity:\n{}",
        m.text
    );
    let all = prom.query(&format!("{{job=\"{JOB}\"}}")).await;
    assert!(all.len() > 20, "{} series scraped", all.len());
    for series in &all {
        assert!(
            series["metric"].get("identity").is_none() && !series.to_string().contains("spiffe://"),
            "scraped over a non-loopback address: {series}"
        );
    }
    for name in super::PER_IDENTITY {
        assert!(prom.query(name).await.is_empty(), "{name} scraped");
    }
}

/// Each dashboard variable's `label_values(...)` finds this agent; each
/// panel's query, with the variables set to it, returns series that carry
/// every label its legend names.
async fn every_panel_returns_data(prom: &Prometheus, instance: &str) {
    let dashboard: Value = serde_json::from_str(&read("dashboard.json")).unwrap();
    let set = |q: &str| {
        q.replace("$job", JOB)
            .replace("$instance", instance)
            .replace("$__rate_interval", "1m")
    };
    for (var, want) in [("job", JOB), ("instance", instance)] {
        let v = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == var)
            .unwrap();
        let query = v["query"]["query"].as_str().unwrap();
        let (matcher, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("${var}: {query}"));
        let values = prom.label_values(label, &set(matcher)).await;
        assert!(
            values.iter().any(|v| v == want),
            "${var}: {query} gives {values:?}"
        );
    }
    for panel in dashboard_panels() {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().unwrap() {
            let expr = set(target["expr"].as_str().unwrap());
            let result = prom.query(&expr).await;
            assert!(!result.is_empty(), "panel {title:?}: no data for {expr}");
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            for label in legend
                .split("{{")
                .skip(1)
                .filter_map(|s| s.split_once("}}"))
            {
                for series in &result {
                    assert!(
                        series["metric"].get(label.0.trim()).is_some(),
                        "panel {title:?}: legend names {}, which {expr} does not give: {series}",
                        label.0
                    );
                }
            }
        }
    }
}

/// Every series selector in the alert expressions (a metric name with its
/// label matchers) selects series of the real agent, and every alert has one.
async fn every_series_the_rules_name_exists(prom: &Prometheus) {
    for rule in alerting_rules(&rule_groups()) {
        let expr = rule["expr"].as_str().unwrap();
        let selectors = selectors(expr);
        assert!(
            !selectors.is_empty(),
            "{}: no selector in {expr}",
            rule["alert"]
        );
        for selector in selectors {
            let result = prom.query(&selector).await;
            assert!(
                !result.is_empty(),
                "{}: {selector} selects nothing",
                rule["alert"]
            );
        }
    }
}

/// The selectors of `expr`: each `node_agent_*`, `process_*` or `up` name
/// with the `{...}` that follows it, if any.
fn selectors(expr: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < expr.len() {
        let rest = &expr[i..];
        let starts_name = i == 0 || !expr[..i].ends_with(ident);
        let len = rest.find(|c| !ident(c)).unwrap_or(rest.len());
        let name = &rest[..len];
        if len > 0
            && starts_name
            && (name.starts_with("node_agent_") || name.starts_with("process_") || name == "up")
        {
            let after = &rest[len..];
            let matchers = if after.starts_with('{') {
                &after[..after.find('}').unwrap() + 1]
            } else {
                ""
            };
            out.push(format!("{name}{matchers}"));
            i += matchers.len();
        }
        i += len.max(1);
    }
    out
}

#[test]
fn selectors_are_read_from_expressions() {
    assert_eq!(
        selectors(
            "timestamp(node_agent_x) - node_agent_y{a=\"b\", c=~\"d|e\", u=\"up\"}[6m] > up{job=~\".*node-agent.*\"} and my_node_agent_z"
        ),
        [
            "node_agent_x",
            "node_agent_y{a=\"b\", c=~\"d|e\", u=\"up\"}",
            "up{job=~\".*node-agent.*\"}"
        ]
    );
}

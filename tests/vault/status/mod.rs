//! The status server and the logs: each endpoint's answers in each state,
//! the metrics as a Prometheus parser reads them, readiness through a Vault
//! outage, a rotation in the counters, and JSON log lines.
//!
//! [`endpoints`] holds the endpoints' answers and readiness; [`held`] the
//! server's bounds, and probes answered while other clients hold the port;
//! [`shown_to`] who sees what names a workload; [`metrics`] the counters
//! and `/debug/identities` through renewals, failures and revocations;
//! [`logs`] the log format and the settings that stop the agent. This file
//! holds the agent, the HTTP GET and the readers of metrics and pages they
//! share.

use crate::support;

use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use support::agent::Agent;
use support::metrics::{scrape, Scrape};

mod endpoints;
mod held;
mod logs;
mod metrics;
mod shown_to;

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

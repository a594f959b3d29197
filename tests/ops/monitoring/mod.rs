//! What deploy/monitoring/ ships, checked offline and against the real thing:
//!
//! - the rules file passes `promtool check rules`, and every alert has a
//!   `promtool test rules` unit test in deploy/monitoring/tests/ in which it
//!   fires and one in which it stays quiet;
//! - the PrometheusRule is what scripts/monitoring-rules.sh makes of the
//!   rules file (the same groups), and it and the PodMonitor have the shape
//!   the Prometheus Operator's v1 API takes ([`check_operator_object`], also
//!   used by the overlay test of tests/ops/deploy/);
//! - every alert has a summary, a severity, a description and a runbook_url
//!   naming its section of docs/monitoring.md, and every such section an alert;
//! - the dashboard is Grafana JSON whose panels query the metrics the
//!   operator looks at first, and neither a panel nor an alert reads a
//!   series labelled with an `identity` (served only to STATUS_DEBUG_FROM);
//! - a real Prometheus scraping a real agent against OpenBao over a
//!   non-loopback address (so without the per-identity series) fires the
//!   renewal alert before the certificate expires and resolves it once
//!   Vault is back, and every panel's query returns data ([`live`]).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use support::manifests::{repo, run, yaml_docs};

mod live;
mod operator;
mod prometheus;

pub use operator::check_operator_object;

fn dir() -> PathBuf {
    repo().join("deploy").join("monitoring")
}

fn read(path: &str) -> String {
    let p = dir().join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The plain rules file's groups.
fn rule_groups() -> Value {
    let docs = yaml_docs(&read("node-agent.rules.yaml"));
    assert_eq!(docs.len(), 1);
    docs[0]["groups"].clone()
}

/// Every alerting rule of `groups`.
fn alerting_rules(groups: &Value) -> Vec<Value> {
    groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

fn alert_names() -> BTreeSet<String> {
    alerting_rules(&rule_groups())
        .iter()
        .map(|r| r["alert"].as_str().unwrap().to_string())
        .collect()
}

/// The dashboard's panels that query (rows left out).
fn dashboard_panels() -> Vec<Value> {
    let d: Value = serde_json::from_str(&read("dashboard.json")).expect("dashboard.json is JSON");
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .cloned()
        .collect()
}

/// The alerts an operator needs at least: renewals, Vault unreachable and
/// refusing, the trust bundle, refusals at limits, absent metrics.
const REQUIRED_ALERTS: &[&str] = &[
    "NodeAgentCertificateRenewalOverdue",
    "NodeAgentVaultUnavailable",
    "NodeAgentVaultRefusing",
    "NodeAgentTrustBundleRefreshFailing",
    "NodeAgentRequestsRefusedByLimits",
    "NodeAgentDown",
    "NodeAgentMetricsAbsent",
];

#[test]
fn rules_pass_promtool_and_every_alert_fires_and_stays_quiet_in_a_unit_test() {
    let out = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(dir().join("node-agent.rules.yaml")));
    assert!(out.contains("SUCCESS"), "{out}");

    let alerts = alert_names();
    for a in REQUIRED_ALERTS {
        assert!(alerts.contains(*a), "no alert {a} in {alerts:?}");
    }
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut files = 0;
    for e in std::fs::read_dir(dir().join("tests")).unwrap() {
        let path = e.unwrap().path();
        files += 1;
        let out = run(Command::new("promtool").args(["test", "rules"]).arg(&path));
        assert!(out.contains("SUCCESS"), "{}: {out}", path.display());
        let text = std::fs::read_to_string(&path).unwrap();
        for test in yaml_docs(&text)[0]["tests"].as_array().unwrap() {
            for case in test["alert_rule_test"].as_array().unwrap() {
                let name = case["alertname"].as_str().unwrap().to_string();
                let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
                if expected > 0 { &mut fires } else { &mut quiet }.insert(name);
            }
        }
    }
    assert!(files >= 5, "{files} unit test files");
    assert_eq!(fires, alerts, "alerts shown firing in a unit test");
    assert_eq!(quiet, alerts, "alerts shown quiet in a unit test");
}

#[test]
fn the_prometheusrule_is_made_from_the_rules_file() {
    let made = run(Command::new(repo().join("scripts/monitoring-rules.sh")).arg("--stdout"));
    assert!(
        made == read("prometheusrule.yaml"),
        "deploy/monitoring/prometheusrule.yaml is not what scripts/monitoring-rules.sh makes of node-agent.rules.yaml: run the script"
    );
    let rule = &yaml_docs(&made)[0];
    assert_eq!(rule["spec"]["groups"], rule_groups());
    check_operator_object(rule);
}

#[test]
fn every_alert_says_what_to_do_and_has_a_runbook_section() {
    let docs = std::fs::read_to_string(repo().join("docs/monitoring.md")).unwrap();
    let sections: BTreeMap<String, String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| (github_anchor(h), h.to_string()))
        .collect();
    let mut runbooks = BTreeSet::new();
    for r in alerting_rules(&rule_groups()) {
        let name = r["alert"].as_str().unwrap();
        for series in PER_IDENTITY {
            assert!(
                !r["expr"].as_str().unwrap().contains(series),
                "{name} reads {series}, which a Prometheus scraping the pod IP does not get by default"
            );
        }
        let severity = r["labels"]["severity"].as_str().unwrap_or_default();
        assert!(["warning", "critical"].contains(&severity), "{name}: {r}");
        let a = &r["annotations"];
        for key in ["summary", "description"] {
            assert!(
                a[key].as_str().is_some_and(|s| s.len() > 20),
                "{name} {key}: {r}"
            );
        }
        let url = a["runbook_url"].as_str().unwrap_or_default();
        let anchor = url
            .strip_prefix("docs/monitoring.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url:?}"));
        assert_eq!(
            sections.get(anchor).map(String::as_str),
            Some(name),
            "{name}: docs/monitoring.md has no section `### {name}` for {url}"
        );
        runbooks.insert(name.to_string());
    }
    let documented: BTreeSet<String> = sections
        .values()
        .filter(|h| h.starts_with("NodeAgent"))
        .cloned()
        .collect();
    assert_eq!(documented, runbooks, "runbook sections without an alert");
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces as `-`.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The series labelled with an `identity`, which the agent serves only to
/// the clients STATUS_DEBUG_FROM allows (loopback by default).
const PER_IDENTITY: &[&str] = &[
    "node_agent_certificate_expiry_timestamp_seconds",
    "node_agent_certificate_expires_in_seconds",
    "node_agent_certificate_renewal_timestamp_seconds",
];

#[test]
fn the_dashboard_has_the_panels_an_operator_looks_at_first() {
    let panels = dashboard_panels();
    let mut ids = BTreeSet::new();
    let mut exprs = String::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} queries nothing");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                expr.contains("job=~\"$job\", instance=~\"$instance\""),
                "{title}: {expr}"
            );
            for name in PER_IDENTITY {
                assert!(
                    !expr.contains(name),
                    "{title}: {name} is served only to STATUS_DEBUG_FROM, which a Prometheus scraping the pod IP is not in by default"
                );
            }
            exprs.push_str(expr);
        }
    }
    // Identities, time to expiry and renewal, overdue and expired; CA rate,
    // errors, latency; pushes and rotations; streams and refusals; memory.
    for metric in [
        "node_agent_identities_cached",
        "node_agent_certificate_earliest_expiry_timestamp_seconds",
        "node_agent_certificate_earliest_renewal_timestamp_seconds",
        "node_agent_certificates_renewal_overdue",
        "node_agent_certificates_expired",
        "node_agent_ca_requests_total",
        "outcome!=\"ok\"",
        "node_agent_ca_request_duration_seconds_bucket",
        "node_agent_sds_pushes_total",
        "node_agent_rotations_total",
        "node_agent_sds_streams_open",
        "node_agent_sds_requests_refused_total",
        "process_resident_memory_bytes",
    ] {
        assert!(exprs.contains(metric), "no panel queries {metric}");
    }
    let d: Value = serde_json::from_str(&read("dashboard.json")).unwrap();
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "job", "instance"]);
}

/// The kustomization ships the dashboard as it is in dashboard.json, for
/// Grafana's sidecar, and the PodMonitor scrapes the DaemonSet's agents.
#[test]
fn the_kustomization_carries_the_dashboard_and_scrapes_the_daemonset() {
    use support::manifests::{name, rendered};
    let objs = rendered("monitoring");
    let kinds: BTreeSet<String> = objs.iter().map(name).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(
            [
                "ConfigMap/node-agent-dashboard",
                "PodMonitor/node-agent",
                "PrometheusRule/node-agent"
            ]
            .map(String::from)
        )
    );
    let cm = objs.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["data"]["node-agent.json"], read("dashboard.json"));

    let monitor = objs.iter().find(|o| o["kind"] == "PodMonitor").unwrap();
    let daemonset = rendered("daemonset");
    let ds = daemonset
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("deploy/daemonset has the DaemonSet");
    assert_eq!(
        monitor["metadata"]["namespace"],
        ds["metadata"]["namespace"]
    );
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&pod_labels[k], v, "the PodMonitor selects {k}={v}");
    }
    let (_, agent) = support::manifests::node_agent_containers(&daemonset)
        .into_iter()
        .next()
        .unwrap();
    for ep in monitor["spec"]["podMetricsEndpoints"].as_array().unwrap() {
        let port = ep["port"].as_str().unwrap();
        assert!(
            agent["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == port),
            "no port {port} on node-agent"
        );
        assert_eq!(ep["path"], "/metrics");
    }
}

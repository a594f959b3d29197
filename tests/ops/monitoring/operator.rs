//! The Prometheus Operator's kinds (CRDs, which the Kubernetes schemas of
//! tests/ops/deploy/ do not hold), checked against the fields of their
//! `monitoring.coreos.com/v1` API: `PrometheusRule` and `PodMonitor`.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support;

/// A `Duration` of the Prometheus Operator's API (`30s`, `1h30m`, `0`).
fn is_duration(s: &str) -> bool {
    if s == "0" {
        return true;
    }
    let mut rest = s;
    let mut units = ["y", "w", "d", "h", "m", "s", "ms"].iter();
    let mut any = false;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        let after = &rest[digits..];
        // The next unit in order ("ms" is tried before "m" at that place).
        let Some(unit) =
            units.find(|u| after.starts_with(**u) && !(**u == "m" && after.starts_with("ms")))
        else {
            return false;
        };
        rest = &after[unit.len()..];
        any = true;
    }
    any
}

/// Checks an object of the Prometheus Operator's `monitoring.coreos.com/v1`
/// API (a CRD, which the Kubernetes schemas of tests/ops/deploy/ do not
/// hold) against the fields of its kind: no unknown field, the types and
/// formats the API takes.
pub fn check_operator_object(obj: &Value) {
    let what = support::manifests::name(obj);
    assert_eq!(obj["apiVersion"], "monitoring.coreos.com/v1", "{what}");
    only_keys(&what, obj, &["apiVersion", "kind", "metadata", "spec"]);
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    assert!(
        !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "{what}: metadata.name"
    );
    string_map(&what, &meta["labels"]);
    let spec = &obj["spec"];
    match obj["kind"].as_str().unwrap() {
        "PrometheusRule" => {
            only_keys(&what, spec, &["groups"]);
            let mut names = BTreeSet::new();
            for g in spec["groups"].as_array().expect("spec.groups") {
                only_keys(&what, g, &["name", "interval", "rules", "limit", "labels"]);
                assert!(
                    names.insert(g["name"].as_str().unwrap()),
                    "{what}: group names repeat"
                );
                for r in g["rules"].as_array().expect("rules") {
                    only_keys(
                        &what,
                        r,
                        &[
                            "alert",
                            "record",
                            "expr",
                            "for",
                            "keep_firing_for",
                            "labels",
                            "annotations",
                        ],
                    );
                    assert!(
                        r["alert"].is_string() != r["record"].is_string(),
                        "{what}: {r}"
                    );
                    assert!(
                        r["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                        "{r}"
                    );
                    if let Some(f) = r.get("for") {
                        assert!(
                            is_duration(f.as_str().unwrap_or_default()),
                            "{what}: for {f}"
                        );
                    }
                    string_map(&what, &r["labels"]);
                    string_map(&what, &r["annotations"]);
                }
            }
        }
        "PodMonitor" => {
            only_keys(
                &what,
                spec,
                &[
                    "selector",
                    "podMetricsEndpoints",
                    "namespaceSelector",
                    "jobLabel",
                ],
            );
            only_keys(
                &what,
                &spec["selector"],
                &["matchLabels", "matchExpressions"],
            );
            string_map(&what, &spec["selector"]["matchLabels"]);
            for ep in spec["podMetricsEndpoints"]
                .as_array()
                .expect("podMetricsEndpoints")
            {
                only_keys(
                    &what,
                    ep,
                    &["port", "path", "interval", "scrapeTimeout", "scheme"],
                );
                assert!(ep["port"].is_string(), "{what}: {ep}");
                for key in ["interval", "scrapeTimeout"] {
                    if let Some(d) = ep.get(key) {
                        assert!(
                            is_duration(d.as_str().unwrap_or_default()),
                            "{what}: {key} {d}"
                        );
                    }
                }
            }
        }
        other => panic!("{what}: no check for kind {other}"),
    }
}

fn only_keys(what: &str, v: &Value, allowed: &[&str]) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {v}"));
    for k in obj.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "{what}: unknown field {k} in {v}"
        );
    }
}

/// Absent, or a map of strings to strings.
fn string_map(what: &str, v: &Value) {
    if v.is_null() {
        return;
    }
    let m = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not a map: {v}"));
    assert!(
        m.values().all(Value::is_string),
        "{what}: values must be strings: {v}"
    );
}

#[test]
fn operator_checks_can_fail() {
    for d in ["30s", "1h30m", "10m", "0", "500ms"] {
        assert!(is_duration(d), "{d}");
    }
    for d in ["", "10", "m", "5 m", "1m1h", "1.5h", "10min"] {
        assert!(!is_duration(d), "{d}");
    }
    let rule = |r: Value| {
        serde_json::json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "x"}, "spec": {"groups": [{"name": "g", "rules": [r]}]}
        })
    };
    for bad in [
        serde_json::json!({"alert": "A", "expr": "up", "for": "5 minutes"}),
        serde_json::json!({"alert": "A", "expr": "up", "labels": {"severity": 1}}),
        serde_json::json!({"alert": "A", "expr": "up", "annotation": {}}),
        serde_json::json!({"alert": "A", "record": "r", "expr": "up"}),
    ] {
        let r = rule(bad.clone());
        assert!(
            std::panic::catch_unwind(|| check_operator_object(&r)).is_err(),
            "accepted {bad}"
        );
    }
    check_operator_object(&rule(
        serde_json::json!({"alert": "A", "expr": "up", "for": "5m"}),
    ));
}

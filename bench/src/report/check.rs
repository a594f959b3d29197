//! `--check`: whether a report is complete, without judging any figure.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context};

use super::Report;
use crate::serving::{FETCH_SHAPES, NEW_STREAM_SHAPES};

/// The goals a complete report judges: memory (3), storm / floor (2), the
/// agent's CPU per certificate in the storm of 1000 (1), Vault
/// load (2), RSS against bao agent's (1), memory per stream of each
/// protocol (3), cached FetchSecrets' rate and CPU over the floor's at each
/// of its shapes (2 × 4), a new stream's rate over the floor's at each shape
/// of each protocol (2 × 3).
const GOALS: usize = 26;

/// `--check`: the report parses into every field above (a missing or null
/// figure fails), holds every measurement the run promises, and every
/// number is finite. Figures are not judged.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let raw: serde_json::Value = serde_json::from_str(&text)?;
    let mut bad = Vec::new();
    walk(&raw, "", &mut bad);
    if !bad.is_empty() {
        bail!("report has empty or non-finite figures: {}", bad.join(", "));
    }
    let r: Report = serde_json::from_value(raw).context("report is missing fields")?;
    let h = &r.harness;
    let mut missing = Vec::new();
    for (key, m) in [
        ("ec-p256", h.identities),
        ("ec-p256", h.large_identities),
        ("rsa-2048", h.rsa_identities),
    ] {
        match r
            .storms
            .iter()
            .find(|s| s.key_type == key && s.identities == m)
        {
            Some(s)
                if s.runs.len() == h.repetitions
                    && s.runs
                        .iter()
                        .all(|t| t.count == m && t.agent_cpu_ms_per_certificate > 0.0) => {}
            _ => missing.push(format!("storm {key} M={m} with {} run(s)", h.repetitions)),
        }
    }
    for m in [h.identities, h.large_identities] {
        if !r
            .floors
            .iter()
            .any(|f| f.identities == m && f.runs.len() == h.repetitions)
        {
            missing.push(format!("floor M={m}"));
        }
        if !r.storm_over_floor.iter().any(|x| x.identities == m) {
            missing.push(format!("storm/floor M={m}"));
        }
        if !r.vault_load.iter().any(|l| l.identities == m) {
            missing.push(format!("Vault load M={m}"));
        }
        for streams in [m, 2 * m] {
            if !r
                .memory
                .points
                .iter()
                .any(|p| p.identities == m && p.streams == streams)
            {
                missing.push(format!("memory at {m} identities × {streams} streams"));
            }
        }
    }
    // Every load shape, measured against the floor and the agent.
    for (what, runs, shapes) in [
        ("FetchSecrets", &r.cached.fetch_secrets, &FETCH_SHAPES[..]),
        (
            "new StreamSecrets stream",
            &r.cached.new_stream,
            &NEW_STREAM_SHAPES[..],
        ),
        (
            "new DeltaSecrets stream",
            &r.cached.delta_new_stream,
            &NEW_STREAM_SHAPES[..],
        ),
    ] {
        for &(c, m) in shapes {
            let measured = runs.iter().any(|p| {
                p.connections == c
                    && p.streams_per_connection == m
                    && [&p.floor, &p.agent]
                        .iter()
                        .all(|s| s.requests > 0 && s.server_cpu_s > 0.0)
            });
            if !measured {
                missing.push(format!("{what} at {c}×{m}, floor and node-agent"));
            }
        }
    }
    let first = r.streams.protocols.first();
    for p in crate::streams::PROTOCOLS {
        match r.streams.protocols.iter().find(|m| m.protocol == p.name()) {
            Some(m)
                if m.streams > 0
                    && first.is_some_and(|f| {
                        f.streams == m.streams && f.connections == m.connections
                    }) => {}
            _ => missing.push(format!(
                "memory per {} stream (at the same streams and connections as the others)",
                p.name()
            )),
        }
    }
    let have: BTreeSet<&str> = r.goals.iter().map(|g| g.goal.as_str()).collect();
    if have.len() < GOALS {
        missing.push(format!("goals (have {}, want {GOALS})", have.len()));
    }
    for (name, v) in [
        ("versions.git_commit", &r.versions.git_commit),
        ("versions.openbao", &r.versions.openbao),
        ("versions.bao_agent", &r.versions.bao_agent),
        ("versions.h2load", &r.versions.h2load),
        ("versions.envoy", &r.versions.envoy),
        ("versions.rustc", &r.versions.rustc),
    ] {
        if v.trim().is_empty() {
            missing.push(name.to_string());
        }
    }
    if r.machine.cores == 0 || r.machine.load_before.len() != 3 || r.machine.load_after.len() != 3 {
        missing.push("machine (cores, load averages)".into());
    }
    if !missing.is_empty() {
        bail!("report is incomplete: {}", missing.join("; "));
    }
    Ok(())
}

fn walk(v: &serde_json::Value, at: &str, bad: &mut Vec<String>) {
    match v {
        serde_json::Value::Null => bad.push(at.to_string()),
        serde_json::Value::Number(n) if !n.as_f64().is_some_and(f64::is_finite) => {
            bad.push(at.to_string())
        }
        serde_json::Value::Array(a) => {
            if a.is_empty() && !at.ends_with("note") {
                bad.push(format!("{at} (empty)"));
            }
            for (i, x) in a.iter().enumerate() {
                walk(x, &format!("{at}/{i}"), bad);
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                walk(x, &format!("{at}/{k}"), bad);
            }
        }
        _ => {}
    }
}

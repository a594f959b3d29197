//! What one run measured: `target/bench/report.json` and the markdown tables,
//! the agent's performance goals each met or not with its figure
//! ([`Report::judge`]), and `--check`, which says whether a report is
//! complete without judging any figure.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::audit::VaultLoad;
use crate::h2load::Serving;
use crate::peer::OneIdentity;
use crate::storm::Timing;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub harness: Harness,
    pub machine: Machine,
    pub versions: Versions,
    /// One entry per (key type, M).
    pub storms: Vec<StormSet>,
    pub floors: Vec<FloorSet>,
    pub storm_over_floor: Vec<Ratio>,
    pub cached: Cached,
    pub memory: Memory,
    pub vault_load: Vec<VaultLoad>,
    pub peer: Peer,
    pub goals: Vec<Goal>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Harness {
    pub mode: String,
    pub identities: usize,
    pub large_identities: usize,
    pub rsa_identities: usize,
    pub repetitions: usize,
    /// `CA_MAX_CONCURRENCY` of the agent and the floor's workers.
    pub ca_max_concurrency: usize,
    pub storm_generator: String,
    /// Size of the `node` Envoy puts in each request (captured from a real Envoy).
    pub envoy_node_bytes: usize,
    pub cached_generator: String,
    pub agent_log_level: String,
    pub duration_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_mib: u64,
    /// 1, 5 and 15 minute load averages before and after the run: the
    /// machine is shared, and figures taken under load must say so.
    pub load_before: Vec<f64>,
    pub load_after: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versions {
    pub node_agent: String,
    pub git_commit: String,
    pub rustc: String,
    pub openbao: String,
    pub bao_agent: String,
    pub h2load: String,
    pub envoy: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormSet {
    pub key_type: String,
    pub identities: usize,
    pub runs: Vec<Timing>,
    /// Medians over the runs: time until every identity held a certificate,
    /// and the spread of the identities' times to their first certificate.
    pub wall_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Each identity's second stream (`ROOTCA`, cached), opened at once.
    pub second_stream: Vec<Timing>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloorSet {
    pub identities: usize,
    pub concurrency: usize,
    pub runs: Vec<Timing>,
    pub wall_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratio {
    pub identities: usize,
    pub storm_wall_s: f64,
    pub floor_wall_s: f64,
    pub storm_over_floor: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cached {
    pub generator: String,
    pub fetch_secrets: Vec<Serving>,
    pub new_stream: Vec<Serving>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MemPoint {
    pub identities: usize,
    pub connections: usize,
    pub streams: usize,
    pub settled_rss_kib: u64,
    pub peak_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    pub idle: MemPoint,
    /// Medians over the runs.
    pub points: Vec<MemPoint>,
    pub fit: Fit,
}

/// settled RSS ≈ base + per_identity × identities + per_stream × streams,
/// least squares over the idle point and the loaded ones. An identity here
/// is one Envoy: its cache entry, its Vault token and its connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fit {
    pub base_kib: f64,
    pub per_identity_kib: f64,
    pub per_stream_kib: f64,
    pub max_residual_kib: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Peer {
    pub bao_agent: OneIdentity,
    pub node_agent: OneIdentity,
    /// node-agent's settled RSS over bao agent's.
    pub rss_ratio: f64,
    pub first_cert_ratio: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub goal: String,
    pub target: String,
    pub figure: f64,
    pub unit: String,
    pub met: bool,
    pub note: String,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Least squares fit of `settled = a + b·identities + c·streams`.
pub fn fit(points: &[MemPoint]) -> Fit {
    let rows: Vec<[f64; 4]> = points
        .iter()
        .map(|p| {
            [
                1.0,
                p.identities as f64,
                p.streams as f64,
                p.settled_rss_kib as f64,
            ]
        })
        .collect();
    // Normal equations AᵀA x = Aᵀy, solved by Gaussian elimination.
    let mut m = [[0.0f64; 4]; 3];
    for r in &rows {
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += r[i] * r[j];
            }
            m[i][3] += r[i] * r[3];
        }
    }
    for col in 0..3 {
        let pivot = (col..3)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        if m[col][col].abs() < 1e-12 {
            return Fit {
                base_kib: f64::NAN,
                per_identity_kib: f64::NAN,
                per_stream_kib: f64::NAN,
                max_residual_kib: f64::NAN,
            };
        }
        let pivot_row = m[col];
        for (row, r) in m.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (x, p) in r.iter_mut().zip(pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let x: Vec<f64> = (0..3).map(|i| m[i][3] / m[i][i]).collect();
    let max_residual = rows
        .iter()
        .map(|r| (x[0] + x[1] * r[1] + x[2] * r[2] - r[3]).abs())
        .fold(0.0, f64::max);
    Fit {
        base_kib: x[0],
        per_identity_kib: x[1],
        per_stream_kib: x[2],
        max_residual_kib: max_residual,
    }
}

/// The Vault load of every run of one storm size, added up.
struct VaultTotals {
    size: usize,
    runs: usize,
    identities: usize,
    logins: usize,
    signs: usize,
    signed_identities: usize,
    distinct_jwts: usize,
    max_signs: usize,
    max_logins: usize,
}

impl Report {
    fn vault_by_size(&self) -> Vec<VaultTotals> {
        let mut out: Vec<VaultTotals> = Vec::new();
        for l in &self.vault_load {
            let i = match out.iter().position(|t| t.size == l.identities) {
                Some(i) => i,
                None => {
                    out.push(VaultTotals {
                        size: l.identities,
                        runs: 0,
                        identities: 0,
                        logins: 0,
                        signs: 0,
                        signed_identities: 0,
                        distinct_jwts: 0,
                        max_signs: 0,
                        max_logins: 0,
                    });
                    out.len() - 1
                }
            };
            let t = &mut out[i];
            t.runs += 1;
            t.identities += l.identities;
            t.logins += l.logins;
            t.signs += l.signs;
            t.signed_identities += l.signed_identities;
            t.distinct_jwts += l.distinct_jwts;
            t.max_signs = t.max_signs.max(l.max_signs_per_identity);
            t.max_logins = t.max_logins.max(l.max_logins_per_jwt);
        }
        out
    }

    /// Evaluates the agent's performance goals from the figures: memory,
    /// storm over floor, cached serving latency and throughput, CA requests
    /// per identity and per JWT, and RSS against `bao agent`'s.
    pub fn judge(&mut self) {
        let mib = |kib: f64| kib / 1024.0;
        let mut goals = Vec::new();
        let mut goal =
            |goal: &str, target: &str, figure: f64, unit: &str, met: bool, note: String| {
                goals.push(Goal {
                    goal: goal.into(),
                    target: target.into(),
                    figure,
                    unit: unit.into(),
                    met: met && figure.is_finite(),
                    note,
                })
            };
        let f = &self.memory.fit;
        let (rss_1000, note) = match self
            .memory
            .points
            .iter()
            .find(|p| p.identities == 1000 && p.streams == 2000)
        {
            Some(p) => (p.settled_rss_kib as f64, "measured".to_string()),
            None => (
                f.base_kib + 1000.0 * f.per_identity_kib + 2000.0 * f.per_stream_kib,
                "from the fit (no 1000 × 2 point in this run)".to_string(),
            ),
        };
        goal(
            "RSS at 1000 identities × 2 streams",
            "≤ 32 MiB",
            mib(rss_1000),
            "MiB",
            mib(rss_1000) <= 32.0,
            note,
        );
        goal(
            "memory per stream",
            "≤ 8 KiB",
            f.per_stream_kib,
            "KiB",
            f.per_stream_kib <= 8.0,
            format!(
                "fitted; per identity (entry, token, connection) {:.1} KiB",
                f.per_identity_kib
            ),
        );
        let idle = self.memory.idle.settled_rss_kib as f64;
        goal(
            "idle RSS",
            "≤ 8 MiB",
            mib(idle),
            "MiB",
            mib(idle) <= 8.0,
            String::new(),
        );
        for r in &self.storm_over_floor {
            goal(
                &format!("storm / floor at M={}", r.identities),
                "≤ 1.05",
                r.storm_over_floor,
                "×",
                r.storm_over_floor <= 1.05,
                format!(
                    "storm {:.2} s, floor {:.2} s",
                    r.storm_wall_s, r.floor_wall_s
                ),
            );
        }
        let at100 = self
            .cached
            .fetch_secrets
            .iter()
            .find(|s| s.concurrency == 100);
        let p99 = at100.map_or(f64::NAN, |s| s.p99_us / 1000.0);
        let rps = at100.map_or(f64::NAN, |s| s.req_per_s);
        let gen = at100.map_or(String::new(), |s| {
            format!(
                "agent used {:.1} s CPU, h2load {:.1} s, in {:.1} s",
                s.agent_cpu_s, s.generator_cpu_s, s.duration_s
            )
        });
        goal(
            "cached FetchSecrets p99 at 100 streams",
            "≤ 1 ms",
            p99,
            "ms",
            p99 <= 1.0,
            gen.clone(),
        );
        goal(
            "cached FetchSecrets throughput at 100 streams (generator on the same cores)",
            "≥ 100000 req/s",
            rps,
            "req/s",
            rps >= 100_000.0,
            gen,
        );
        let signs_exact = self.vault_load.iter().all(|l| {
            l.signs == l.identities
                && l.signed_identities == l.identities
                && l.max_signs_per_identity == 1
                && l.min_signs_per_identity == 1
        });
        let max_signs = self
            .vault_load
            .iter()
            .map(|l| l.max_signs_per_identity as f64)
            .fold(0.0, f64::max);
        goal(
            "signs per identity per issuance",
            "exactly 1",
            max_signs,
            "signs (most for one identity)",
            signs_exact && !self.vault_load.is_empty(),
            self.vault_by_size()
                .iter()
                .map(|t| {
                    format!(
                        "M={} × {} runs: {} signs for {} identities",
                        t.size, t.runs, t.signs, t.signed_identities
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        );
        let max_logins = self
            .vault_load
            .iter()
            .map(|l| l.max_logins_per_jwt as f64)
            .fold(0.0, f64::max);
        goal(
            "logins per distinct JWT",
            "≤ 1",
            max_logins,
            "logins (most for one JWT)",
            max_logins <= 1.0 && !self.vault_load.is_empty(),
            self.vault_by_size()
                .iter()
                .map(|t| {
                    format!(
                        "M={} × {} runs: {} logins for {} JWTs",
                        t.size, t.runs, t.logins, t.distinct_jwts
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        );
        goal(
            "node-agent RSS for one identity / bao agent's",
            "≤ 0.2",
            self.peer.rss_ratio,
            "×",
            self.peer.rss_ratio <= 0.2,
            format!(
                "{:.1} MiB vs {:.1} MiB",
                mib(self.peer.node_agent.settled_rss_kib as f64),
                mib(self.peer.bao_agent.settled_rss_kib as f64)
            ),
        );
        self.goals = goals;
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let mib = |kib: u64| kib as f64 / 1024.0;
        let m = &self.machine;
        let _ = writeln!(
            s,
            "node-agent {} ({}) · {} · {} · h2load {} · {} cores ({}) · load average before {:.2}, after {:.2}",
            self.versions.node_agent,
            short(&self.versions.git_commit),
            self.versions.openbao,
            self.versions.rustc,
            self.versions.h2load.trim_start_matches("h2load nghttp2/"),
            m.cores,
            m.cpu_model,
            m.load_before.first().copied().unwrap_or(f64::NAN),
            m.load_after.first().copied().unwrap_or(f64::NAN),
        );
        let _ = writeln!(
            s,
            "\nmode {}: {} repetition(s), medians shown; CA_MAX_CONCURRENCY {}; storm generator: {}; \
             Envoy's node ({}) is {} bytes",
            self.harness.mode,
            self.harness.repetitions,
            self.harness.ca_max_concurrency,
            self.harness.storm_generator,
            self.versions.envoy.split_whitespace().last().unwrap_or_default(),
            self.harness.envoy_node_bytes
        );
        let _ = writeln!(s, "\n| storm (all ask at once) | M | all hold a certificate | p50 | p99 | floor (login+sign straight to OpenBao) | storm / floor |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for st in &self.storms {
            let ratio = self
                .storm_over_floor
                .iter()
                .find(|r| r.identities == st.identities && st.key_type == "ec-p256");
            let floor = self
                .floors
                .iter()
                .find(|f| f.identities == st.identities && st.key_type == "ec-p256");
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} s | {:.0} ms | {:.0} ms | {} | {} |",
                st.key_type,
                st.identities,
                st.wall_s,
                st.p50_ms,
                st.p99_ms,
                floor.map_or("–".into(), |f| format!("{:.2} s", f.wall_s)),
                ratio.map_or("–".into(), |r| format!("{:.2}", r.storm_over_floor)),
            );
        }
        let _ = writeln!(s, "\n| cached serving ({}) | streams | request | req/s | mean | p50 | p99 | p99.9 | CPU agent / h2load |", self.cached.generator);
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for r in self
            .cached
            .fetch_secrets
            .iter()
            .chain(&self.cached.new_stream)
        {
            let what = if r.method == "FetchSecrets" {
                "FetchSecrets"
            } else {
                "new stream, first response"
            };
            let _ = writeln!(
                s,
                "| {what} | {} ({}×{}) | {} B | {:.0} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.1} s / {:.1} s of {:.0} s |",
                r.concurrency,
                r.connections,
                r.streams_per_connection,
                r.request_bytes,
                r.req_per_s,
                r.mean_us / 1e3,
                r.p50_us / 1e3,
                r.p99_us / 1e3,
                r.p999_us / 1e3,
                r.agent_cpu_s,
                r.generator_cpu_s,
                r.duration_s,
            );
        }
        let _ = writeln!(
            s,
            "\n| node-agent memory | identities (connections) | streams | settled RSS | peak RSS |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (label, p) in std::iter::once(("idle", &self.memory.idle))
            .chain(self.memory.points.iter().map(|p| ("loaded", p)))
        {
            let _ = writeln!(
                s,
                "| {label} | {} | {} | {:.1} MiB | {:.1} MiB |",
                p.identities,
                p.streams,
                mib(p.settled_rss_kib),
                mib(p.peak_rss_kib)
            );
        }
        let f = &self.memory.fit;
        let _ = writeln!(
            s,
            "| fit | {:.1} KiB per identity | {:.1} KiB per stream | base {:.1} MiB | worst residual {:.0} KiB |",
            f.per_identity_kib,
            f.per_stream_kib,
            f.base_kib / 1024.0,
            f.max_residual_kib
        );
        let _ = writeln!(s, "\n| Vault load (audit log) | M | logins / identity | signs / identity | most signs for one identity | most logins for one JWT |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for t in self.vault_by_size() {
            let n = t.identities.max(1) as f64;
            let _ = writeln!(
                s,
                "| storm + second streams ({} runs) | {} | {:.2} | {:.2} | {} | {} |",
                t.runs,
                t.size,
                t.logins as f64 / n,
                t.signs as f64 / n,
                t.max_signs,
                t.max_logins
            );
        }
        let p = &self.peer;
        let _ = writeln!(
            s,
            "\n| one identity | first certificate after spawn | settled RSS | peak RSS |"
        );
        let _ = writeln!(s, "|---|---|---|---|");
        for (name, o) in [
            (
                "bao agent (kubernetes auto-auth, pkiCert template)",
                &p.bao_agent,
            ),
            ("node-agent (one Envoy: default + ROOTCA)", &p.node_agent),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {:.0} ms | {:.1} MiB | {:.1} MiB |",
                o.first_cert_ms,
                mib(o.settled_rss_kib),
                mib(o.peak_rss_kib)
            );
        }
        let _ = writeln!(s, "\n| goal | target | figure | met |");
        let _ = writeln!(s, "|---|---|---|---|");
        for g in &self.goals {
            let note = if g.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", g.note)
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} {}{note} | {} |",
                g.goal,
                g.target,
                fmt_figure(g.figure),
                g.unit,
                if g.met { "yes" } else { "**no**" }
            );
        }
        s
    }
}

fn fmt_figure(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(10)]
}

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
            Some(s) if s.runs.len() == h.repetitions && s.runs.iter().all(|t| t.count == m) => {}
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
    for (what, runs) in [
        ("FetchSecrets", &r.cached.fetch_secrets),
        ("new stream", &r.cached.new_stream),
    ] {
        let have: BTreeSet<usize> = runs.iter().map(|s| s.concurrency).collect();
        for c in [1, 100, 1000] {
            if !have.contains(&c) {
                missing.push(format!("{what} at {c} streams"));
            }
        }
    }
    let have: BTreeSet<&str> = r.goals.iter().map(|g| g.goal.as_str()).collect();
    if have.len() < 10 {
        missing.push(format!("goals (have {}, want 10)", have.len()));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_linear_model() {
        let p = |i: usize, s: usize| MemPoint {
            identities: i,
            connections: i,
            streams: s,
            settled_rss_kib: (7000 + 12 * i + 5 * s) as u64,
            peak_rss_kib: 0,
        };
        let f = fit(&[p(0, 0), p(100, 100), p(100, 200), p(500, 500), p(500, 1000)]);
        assert!((f.base_kib - 7000.0).abs() < 1e-6, "{f:?}");
        assert!((f.per_identity_kib - 12.0).abs() < 1e-6, "{f:?}");
        assert!((f.per_stream_kib - 5.0).abs() < 1e-6, "{f:?}");
        // Identities and streams moving together cannot be told apart.
        assert!(fit(&[p(0, 0), p(100, 100), p(500, 500)])
            .per_stream_kib
            .is_nan());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(crate::storm::percentile(&v, 0.5), 500);
        assert_eq!(crate::storm::percentile(&v, 0.99), 990);
        assert_eq!(crate::storm::percentile(&v, 0.999), 999);
        assert_eq!(crate::storm::percentile(&[7u64], 0.99), 7);
    }
}

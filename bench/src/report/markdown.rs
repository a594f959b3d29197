//! The report as markdown tables.

use std::fmt::Write as _;

use super::{Cached, Goal, Report};
use crate::streams::StreamsMemory;

impl Report {
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
            "\nmode {} ({}): {} repetition(s), medians shown; CA_MAX_CONCURRENCY {}; storm generator: {}; \
             Envoy's node ({}) is {} bytes",
            self.harness.mode,
            self.harness.agent_bin,
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
        s.push('\n');
        s.push_str(&serving_table(&self.cached));
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
        s.push('\n');
        s.push_str(&streams_table(&self.streams));
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
        s.push('\n');
        s.push_str(&goals_table(&self.goals));
        s
    }
}

/// Each goal, its target, the figure and whether it is met.
pub fn goals_table(goals: &[Goal]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| goal | target | figure | met |");
    let _ = writeln!(s, "|---|---|---|---|");
    for g in goals {
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

/// Cached serving: each figure of the floor and the agent, and the agent's
/// over the floor's.
pub fn serving_table(c: &Cached) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| cached serving ({}): serving floor / node-agent (node-agent ÷ floor) | connections × streams | request | response | req/s | server CPU per request | mean | p50 | p99 | p99.9 | h2load CPU, its warm-up included |",
        c.generator
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    let ms = |us: f64| us / 1e3;
    for p in c
        .fetch_secrets
        .iter()
        .chain(&c.new_stream)
        .chain(&c.delta_new_stream)
    {
        let what = if p.method == "FetchSecrets" {
            "FetchSecrets".to_string()
        } else {
            format!("new {} stream, first response", p.method)
        };
        let (f, a) = (&p.floor, &p.agent);
        let answer = match p.method.as_str() {
            "FetchSecrets" => c.answer_bytes[0],
            "StreamSecrets" => c.answer_bytes[1],
            _ => c.answer_bytes[2],
        };
        let _ = writeln!(
            s,
            "| {what} | {}×{} | {} B | {answer} B | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} s |",
            p.connections,
            p.streams_per_connection,
            a.request_bytes,
            cell(f.req_per_s, a.req_per_s, 0, ""),
            cell(f.server_cpu_us_per_request, a.server_cpu_us_per_request, 1, " µs"),
            cell(ms(f.mean_us), ms(a.mean_us), 3, " ms"),
            cell(ms(f.p50_us), ms(a.p50_us), 3, " ms"),
            cell(ms(f.p99_us), ms(a.p99_us), 3, " ms"),
            cell(ms(f.p999_us), ms(a.p999_us), 3, " ms"),
            f.generator_cpu_s,
            a.generator_cpu_s,
        );
    }
    let _ = writeln!(
        s,
        "\n(The serving floor: {}. Request and response: the gRPC message h2load sends, and the one node-agent \
         answered it with, which the floor serves. Each run measures {:.0} s after a warm-up; rates and \
         latencies leave the warm-up out; server CPU is from the warm-up's end to h2load's exit, over the \
         requests counted.)",
        c.floor,
        c.fetch_secrets
            .first()
            .map_or(f64::NAN, |p| p.agent.duration_s)
    );
    s
}

/// `floor / agent (agent ÷ floor)`, with `digits` decimals.
fn cell(floor: f64, agent: f64, digits: usize, unit: &str) -> String {
    format!(
        "{floor:.digits$} / {agent:.digits$}{unit} ({:.2})",
        agent / floor
    )
}

/// Memory per open stream of each protocol, with how it was measured.
pub fn streams_table(m: &StreamsMemory) -> String {
    let mut s = String::new();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        s,
        "| memory per open stream | streams (connections) | settled RSS: warm / connections open / streams open | peak RSS | per stream | per connection | per stream with its share of a connection | all served in |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for p in &m.protocols {
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {:.1} / {:.1} / {:.1} MiB | {:.1} MiB | {:.1} KiB (rounds: {}) | {:.1} KiB | {:.1} KiB | {:.2} s |",
            p.protocol,
            p.streams,
            p.connections,
            mib(p.warm_rss_kib),
            mib(p.connected_rss_kib),
            mib(p.loaded_rss_kib),
            mib(p.peak_rss_kib),
            p.per_stream_kib,
            p.runs_per_stream_kib
                .iter()
                .map(|k| format!("{k:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            p.per_connection_kib,
            p.per_stream_with_connection_kib,
            p.open_s,
        );
    }
    let _ = writeln!(s, "\n({})", m.method);
    s
}

//! The agent's performance goals, each met or not with its figure.

use super::{Cached, Goal, Paired, Report};

/// The Vault load of every run of one storm size, added up.
pub(super) struct VaultTotals {
    pub(super) size: usize,
    pub(super) runs: usize,
    pub(super) identities: usize,
    pub(super) logins: usize,
    pub(super) signs: usize,
    pub(super) signed_identities: usize,
    pub(super) distinct_jwts: usize,
    pub(super) max_signs: usize,
    pub(super) max_logins: usize,
}

impl Report {
    pub(super) fn vault_by_size(&self) -> Vec<VaultTotals> {
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
    /// storm over floor, CA requests per identity and per JWT, RSS against
    /// `bao agent`'s, memory per stream, and cached serving's rate and CPU
    /// over the serving floor's.
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
                "≤ 1.1",
                r.storm_over_floor,
                "×",
                r.storm_over_floor <= 1.1,
                format!(
                    "storm {:.2} s, floor {:.2} s",
                    r.storm_wall_s, r.floor_wall_s
                ),
            );
        }
        let storm_1000 = self
            .storms
            .iter()
            .find(|st| st.key_type == "ec-p256" && st.identities == 1000);
        let cpu = storm_1000.map_or(f64::NAN, |st| {
            super::median(
                st.runs
                    .iter()
                    .map(|t| t.agent_cpu_ms_per_certificate)
                    .collect(),
            )
        });
        goal(
            "agent CPU per issued certificate (EC P-256, storm of 1000)",
            "≤ 0.5 ms",
            cpu,
            "ms",
            cpu > 0.0 && cpu <= 0.5,
            storm_1000.map_or("no storm of 1000 in this run".into(), |st| {
                format!(
                    "median of {} runs: the agent's user + system CPU during the storm over the certificates issued",
                    st.runs.len()
                )
            }),
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
        for p in crate::streams::PROTOCOLS {
            let m = self
                .streams
                .protocols
                .iter()
                .find(|m| m.protocol == p.name());
            let figure = m.map_or(f64::NAN, |m| m.per_stream_kib);
            goal(
                &format!("memory per open {} stream", p.name()),
                &format!("≤ {} KiB", crate::streams::GOAL_KIB),
                figure,
                "KiB",
                figure <= crate::streams::GOAL_KIB,
                m.map_or("not measured".into(), |m| {
                    format!(
                        "{} streams over {} connections; {:.1} KiB with its share of a connection, {:.1} KiB per connection",
                        m.streams, m.connections, m.per_stream_with_connection_kib, m.per_connection_kib
                    )
                }),
            );
        }
        goals.extend(serving_goals(&self.cached));
        self.goals = goals;
    }
}

/// The serving goals: the agent's figures over the serving floor's,
/// measured in the same run, at each load shape.
pub fn serving_goals(c: &Cached) -> Vec<Goal> {
    let mut goals = Vec::new();
    let mut goal = |goal: String, target: &str, figure: f64, met: bool, note: String| {
        goals.push(Goal {
            goal,
            target: target.into(),
            figure,
            unit: "×".into(),
            met: met && figure.is_finite(),
            note,
        })
    };
    let shape = |p: &Paired| format!("{}×{}", p.connections, p.streams_per_connection);
    for p in &c.fetch_secrets {
        goal(
            format!(
                "cached FetchSecrets req/s at {}, over the serving floor's",
                shape(p)
            ),
            "≥ 0.9",
            p.req_per_s_ratio,
            p.req_per_s_ratio >= 0.9,
            format!("{:.0} vs {:.0} req/s", p.agent.req_per_s, p.floor.req_per_s),
        );
    }
    for p in &c.fetch_secrets {
        goal(
            format!(
                "CPU per cached FetchSecrets at {}, over the serving floor's",
                shape(p)
            ),
            "≤ 1.15",
            p.cpu_per_request_ratio,
            p.cpu_per_request_ratio <= 1.15,
            format!(
                "{:.1} vs {:.1} µs",
                p.agent.server_cpu_us_per_request, p.floor.server_cpu_us_per_request
            ),
        );
    }
    for p in c.new_stream.iter().chain(&c.delta_new_stream) {
        goal(
            format!(
                "new {} stream's first response, req/s at {}, over the serving floor's",
                p.method,
                shape(p)
            ),
            "≥ 0.8",
            p.req_per_s_ratio,
            p.req_per_s_ratio >= 0.8,
            format!(
                "{:.0} vs {:.0} req/s; CPU {:.1} vs {:.1} µs per request",
                p.agent.req_per_s,
                p.floor.req_per_s,
                p.agent.server_cpu_us_per_request,
                p.floor.server_cpu_us_per_request
            ),
        );
    }
    goals
}

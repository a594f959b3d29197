//! What one run measured: `target/bench/report.json` and the markdown tables,
//! the agent's performance goals each met or not with its figure
//! ([`Report::judge`]), and `--check`, which says whether a report is
//! complete without judging any figure.
//!
//! [`fit`] fits memory per identity and per stream; [`Report::judge`] is in
//! `goals.rs`, [`Report::markdown`] in `markdown.rs`, [`check`] in `check.rs`.

mod check;
mod fit;
mod goals;
mod markdown;

use serde::{Deserialize, Serialize};

use crate::audit::VaultLoad;
use crate::h2load::Serving;
use crate::peer::OneIdentity;
use crate::storm::Timing;
use crate::streams::StreamsMemory;

pub use check::check;
pub use fit::{fit, Fit};
pub use goals::serving_goals;
pub use markdown::{goals_table, serving_table, streams_table};

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
    /// Memory per open stream of each protocol; absent from reports made
    /// before it was measured, which `--check` then calls incomplete.
    #[serde(default)]
    pub streams: StreamsMemory,
    pub vault_load: Vec<VaultLoad>,
    pub peer: Peer,
    pub goals: Vec<Goal>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Harness {
    pub mode: String,
    /// The node-agent binary measured: a release build unless `--agent-bin`
    /// named another (CI's check runs the tests' debug build, whose figures
    /// only show that every measurement runs).
    #[serde(default)]
    pub agent_bin: String,
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

/// Cached serving: every load shape measured against the floor and the
/// agent in the same run (see `serving`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cached {
    pub generator: String,
    /// What the floor is.
    pub floor: String,
    /// Sizes of the answers the floor serves (node-agent's, captured),
    /// gRPC messages without their 5-byte prefix:
    /// FetchSecrets, StreamSecrets, DeltaSecrets.
    pub answer_bytes: [usize; 3],
    pub fetch_secrets: Vec<Paired>,
    /// A new StreamSecrets stream's first response, Envoy's request.
    pub new_stream: Vec<Paired>,
    /// A new DeltaSecrets stream's first response, Envoy's request.
    pub delta_new_stream: Vec<Paired>,
}

/// One load shape against the floor and the agent, and the agent's figures
/// over the floor's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paired {
    pub method: String,
    pub connections: usize,
    pub streams_per_connection: usize,
    pub floor: Serving,
    pub agent: Serving,
    pub req_per_s_ratio: f64,
    pub cpu_per_request_ratio: f64,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
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

#[cfg(test)]
mod tests {

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(crate::storm::percentile(&v, 0.5), 500);
        assert_eq!(crate::storm::percentile(&v, 0.99), 990);
        assert_eq!(crate::storm::percentile(&v, 0.999), 999);
        assert_eq!(crate::storm::percentile(&[7u64], 0.99), 7);
    }
}

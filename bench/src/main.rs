//! node-agent's benchmark harness: one command that starts a real
//! OpenBao (`no_store` PKI role, kubernetes auth backed by a TokenReview
//! stand-in that really verifies JWTs), node-agent in release mode, and load
//! generators that speak SDS as Envoy does, and measures in one run:
//!
//! 1. storm: M identities asking at once, each with its own JWT;
//! 2. floor: the same M login+sign pairs straight to OpenBao (same HTTP
//!    client settings and concurrency, CSRs made beforehand); storm / floor;
//! 3. cached serving with h2load, each figure next to the serving floor's
//!    (tonic answering with node-agent's bytes, `floor_server`) measured in
//!    the same run: FetchSecrets at 1×1, 100×1, 10×10 and 1000×1
//!    connections × streams, a new StreamSecrets or DeltaSecrets stream's
//!    first response at 1×1, 10×10 and 100×10;
//! 4. memory: idle, M × 1 and M × 2 streams at two sizes, fitted per identity
//!    and per stream;
//! 5. Vault load from OpenBao's audit log;
//! 6. the peer, `bao agent`, keeping one identity's certificate;
//! 7. key types: the storm with EC P-256 and RSA-2048;
//! 8. memory per open stream of StreamSecrets, DeltaSecrets and the Workload
//!    API's FetchX509SVID, each on a fresh LocalCA agent.
//!
//! It prints markdown tables and writes `target/bench/report.json`. It prints
//! figures and judges goals; it never fails on a figure. `--check REPORT`
//! says whether a report is complete.
//!
//! ```text
//! cargo run --release -p node-agent-bench -- [--quick]
//! cargo run --release -p node-agent-bench -- --check target/bench/report.json
//! ```

mod audit;
mod envoy_node;
mod floor;
mod floor_server;
mod h2load;
mod measure;
mod peer;
mod procs;
mod report;
mod run;
mod sds;
mod serving;
mod storm;
mod streams;
mod support;
mod vault;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use report::Report;

/// CA requests in flight: the agent's default, given to both the agent and
/// the floor so that they are compared at the same concurrency.
const CA_MAX_CONCURRENCY: usize = 16;
const LOG_LEVEL: &str = "info";

/// `--agent-env` settings, added to every agent's.
static EXTRA_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

#[derive(Parser, Debug)]
#[command(
    about = "node-agent benchmark: storm vs floor, cached serving, memory, memory per stream per protocol, Vault load, bao agent"
)]
pub struct Args {
    /// Smaller sizes and one repetition (under two minutes once built).
    #[arg(long)]
    pub quick: bool,
    /// Only check that REPORT is complete (every figure present); judges nothing.
    #[arg(long, value_name = "REPORT")]
    pub check: Option<PathBuf>,
    /// Only print REPORT's tables again.
    #[arg(long, value_name = "REPORT")]
    pub show: Option<PathBuf>,
    /// M, the storm size [default: 1000; quick 200].
    #[arg(long)]
    pub identities: Option<usize>,
    /// The second storm size [default: 5000; quick 1000].
    #[arg(long)]
    pub large: Option<usize>,
    /// Storm size with RSA-2048 keys [default: 200; quick 50]. Each RSA key
    /// costs the agent tens of milliseconds of CPU, so this storm is smaller.
    #[arg(long)]
    pub rsa_identities: Option<usize>,
    /// Repetitions of storms and floors [default: 3; quick 1].
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// Seconds each h2load run measures [default: 5; quick 1].
    #[arg(long)]
    pub serve_seconds: Option<f64>,
    /// The node-agent binary [default: builds target/release/node-agent].
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Where report.json and the run's logs go [default: target/bench].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// An extra setting for every agent started (repeatable), e.g. to try
    /// MALLOC_ARENA_MAX=2.
    #[arg(long = "agent-env", value_name = "KEY=VALUE")]
    pub agent_env: Vec<String>,
    /// Only the memory points (idle, M × 1 and × 2 at both sizes, once) and
    /// their fit, printed; no report.json. For work on memory.
    #[arg(long)]
    pub memory_only: bool,
    /// Only the cached-serving runs (h2load, the floor and the agent),
    /// printed; no report.json. For work on the serving path (e.g. with
    /// `--agent-bin` a script that records the agent with perf).
    #[arg(long)]
    pub serving_only: bool,
    /// Runs the serving floor on the answers in DIR (the harness starts it).
    #[arg(long, value_name = "DIR", hide = true)]
    pub floor_server: Option<PathBuf>,
    /// Only memory per open stream of StreamSecrets, DeltaSecrets and
    /// FetchX509SVID (LocalCA, no Vault), printed; no report.json.
    #[arg(long)]
    pub streams_only: bool,
    /// N, the streams opened per protocol to measure memory per stream
    /// [default: 1000; quick 300].
    #[arg(long)]
    pub streams: Option<usize>,
    /// Streams per connection for that measurement [default: 2, as an Envoy
    /// opens `default` and `ROOTCA` on one connection].
    #[arg(long, default_value_t = 2)]
    pub streams_per_connection: usize,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.floor_server {
        return floor_server::main(dir);
    }
    if let Some(path) = &args.check {
        report::check(path)?;
        println!("{}: complete", path.display());
        return Ok(());
    }
    if let Some(path) = &args.show {
        let mut r: Report = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        r.judge();
        println!("{}", r.markdown());
        return Ok(());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()?;
    rt.block_on(run::run(args, cores))
}

pub struct Sizes {
    pub m: usize,
    pub large: usize,
    pub rsa: usize,
    pub reps: usize,
    pub serve: Duration,
    pub warm_up: Duration,
}

fn build_agent() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            "node-agent",
            "--bin",
            "node-agent",
        ])
        .status()
        .context("run cargo build")?;
    if !st.success() {
        bail!("building node-agent failed");
    }
    Ok(target_dir().join("release").join("node-agent"))
}

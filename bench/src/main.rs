//! node-agent's benchmark harness: one command that starts a real
//! OpenBao (`no_store` PKI role, kubernetes auth backed by a TokenReview
//! stand-in that really verifies JWTs), node-agent in release mode, and load
//! generators that speak SDS as Envoy does, and measures in one run:
//!
//! 1. storm: M identities asking at once, each with its own JWT;
//! 2. floor: the same M login+sign pairs straight to OpenBao (same HTTP
//!    client settings and concurrency, CSRs made beforehand); storm / floor;
//! 3. cached serving with h2load: FetchSecrets and a new stream's first
//!    response at 1, 100 and 1000 streams;
//! 4. memory: idle, M × 1 and M × 2 streams at two sizes, fitted per identity
//!    and per stream;
//! 5. Vault load from OpenBao's audit log;
//! 6. the peer, `bao agent`, keeping one identity's certificate;
//! 7. key types: the storm with EC P-256 and RSA-2048.
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
mod h2load;
mod peer;
mod procs;
mod report;
mod sds;
mod storm;
mod support;
mod vault;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use node_agent::crypto::{KeyType, PrivateKey};
use node_agent::identity::SpiffeId;
use report::{median, FloorSet, MemPoint, Report, StormSet};
use storm::Timing;
use vault::VaultBench;

/// CA requests in flight: the agent's default, given to both the agent and
/// the floor so that they are compared at the same concurrency.
const CA_MAX_CONCURRENCY: usize = 16;
const LOG_LEVEL: &str = "info";

/// `--agent-env` settings, added to every agent's.
static EXTRA_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

#[derive(Parser, Debug)]
#[command(
    about = "node-agent benchmark: storm vs floor, cached serving, memory, Vault load, bao agent"
)]
struct Args {
    /// Smaller sizes and one repetition (under two minutes once built).
    #[arg(long)]
    quick: bool,
    /// Only check that REPORT is complete (every figure present); judges nothing.
    #[arg(long, value_name = "REPORT")]
    check: Option<PathBuf>,
    /// Only print REPORT's tables again.
    #[arg(long, value_name = "REPORT")]
    show: Option<PathBuf>,
    /// M, the storm size [default: 1000; quick 200].
    #[arg(long)]
    identities: Option<usize>,
    /// The second storm size [default: 5000; quick 1000].
    #[arg(long)]
    large: Option<usize>,
    /// Storm size with RSA-2048 keys [default: 200; quick 50]. Each RSA key
    /// costs the agent tens of milliseconds of CPU, so this storm is smaller.
    #[arg(long)]
    rsa_identities: Option<usize>,
    /// Repetitions of storms and floors [default: 3; quick 1].
    #[arg(long)]
    repetitions: Option<usize>,
    /// Seconds each h2load run measures [default: 5; quick 2].
    #[arg(long)]
    serve_seconds: Option<f64>,
    /// The node-agent binary [default: builds target/release/node-agent].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Where report.json and the run's logs go [default: target/bench].
    #[arg(long)]
    out: Option<PathBuf>,
    /// An extra setting for every agent started (repeatable), e.g. to try
    /// MALLOC_ARENA_MAX=2.
    #[arg(long = "agent-env", value_name = "KEY=VALUE")]
    agent_env: Vec<String>,
    /// Only the memory points (idle, M × 1 and × 2 at both sizes, once) and
    /// their fit, printed; no report.json. For work on memory.
    #[arg(long)]
    memory_only: bool,
    /// Only the cached-serving runs (h2load), printed; no report.json. For
    /// work on the serving path (e.g. with `--agent-bin` a script that
    /// records the agent with perf).
    #[arg(long)]
    serving_only: bool,
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
    rt.block_on(run(args, cores))
}

struct Sizes {
    m: usize,
    large: usize,
    rsa: usize,
    reps: usize,
    serve: Duration,
    warm_up: Duration,
}

async fn run(args: Args, cores: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let quick = args.quick;
    let m = args.identities.unwrap_or(if quick { 200 } else { 1000 });
    let s = Sizes {
        m,
        large: args.large.unwrap_or(if quick { 1000 } else { 5000 }),
        rsa: args.rsa_identities.unwrap_or(if quick { 50 } else { 200 }),
        reps: args.repetitions.unwrap_or(if quick { 1 } else { 3 }).max(1),
        serve: Duration::from_secs_f64(args.serve_seconds.unwrap_or(if quick { 2.0 } else { 5.0 })),
        warm_up: Duration::from_millis(if quick { 500 } else { 1000 }),
    };
    if s.large == s.m {
        bail!("--large must differ from --identities (two sizes are needed to fit memory)");
    }
    let mut extra = Vec::new();
    for kv in &args.agent_env {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--agent-env {kv:?}: expected KEY=VALUE");
        };
        extra.push((k.to_string(), v.to_string()));
    }
    let _ = EXTRA_ENV.set(extra);
    let load_before = load_average();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench"));
    let work = out.join("run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let bin = match &args.agent_bin {
        Some(b) => b.clone(),
        None => build_agent()?,
    };
    let h2load_version = h2load::version()?;
    let bao_bin = peer::bao_binary()?;
    eprintln!(
        "bench: M={} and {}, RSA {}, {} repetition(s); load average {:?}",
        s.m, s.large, s.rsa, s.reps, load_before
    );

    // The node a real Envoy sends goes into every request the generators send.
    let (node, envoy_version) = envoy_node::capture(&work).await?;
    let envoy_node_bytes = prost::Message::encoded_len(&node);
    let _ = sds::ENVOY_NODE.set(node);
    eprintln!("bench: {envoy_version}: its node is {envoy_node_bytes} bytes in every request");

    let v = VaultBench::start(&work).await?;
    if args.memory_only {
        return memory_only(&v, &bin, &work, &s).await;
    }
    if args.serving_only {
        let (fetch, streams) = cached_serving(&v, &bin, &work, &s).await?;
        println!("| method | streams | req/s | mean | p50 | p99 | p99.9 | agent CPU per request |\n|---|---|---|---|---|---|---|---|");
        for r in fetch.iter().chain(&streams) {
            println!(
                "| {} | {} | {:.0} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.1} us |",
                r.method,
                r.concurrency,
                r.req_per_s,
                r.mean_us / 1e3,
                r.p50_us / 1e3,
                r.p99_us / 1e3,
                r.p999_us / 1e3,
                // The CPU figure spans the warm-up too; h2load's rate does not.
                r.agent_cpu_s * 1e6 / (r.req_per_s * (s.serve + s.warm_up).as_secs_f64()).max(1.0)
            );
        }
        return Ok(());
    }
    let openbao = v
        .bao
        .call(reqwest::Method::GET, "sys/seal-status", None, None)
        .await?
        .1["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    eprintln!("bench: idle memory");
    let idle = idle_memory(&v, &bin, &work).await?;

    eprintln!("bench: peer (bao agent and node-agent, one identity)");
    let bao_agent = peer::bao_agent(&v, &work).await?;
    let node_agent = peer::node_agent(&v, &bin, &work).await?;

    let mut storm_runs: Vec<(usize, Timing, Timing)> = Vec::new();
    let mut floor_runs: Vec<(usize, Timing)> = Vec::new();
    let mut mem_points: Vec<MemPoint> = Vec::new();
    let mut loads: Vec<audit::VaultLoad> = Vec::new();
    let mut rsa_runs: Vec<(Timing, Timing)> = Vec::new();
    for rep in 0..s.reps {
        for &size in &[s.m, s.large] {
            // Alternate which goes first, so that neither always meets the
            // fresher Vault; each uses service accounts Vault has not seen.
            let floor_first = rep % 2 == 0;
            if floor_first {
                floor_runs.push((size, floor(&v, rep, size).await?));
            }
            let (st, second, points, load) =
                storm(&v, &bin, &work, rep, size, KeyType::EcP256).await?;
            storm_runs.push((size, st, second));
            mem_points.extend(points);
            loads.push(load);
            if !floor_first {
                floor_runs.push((size, floor(&v, rep, size).await?));
            }
        }
        let (st, second, _, _) = storm(&v, &bin, &work, rep, s.rsa, KeyType::Rsa2048).await?;
        rsa_runs.push((st, second));
    }

    eprintln!("bench: cached serving (h2load)");
    let (fetch_secrets, new_stream) = cached_serving(&v, &bin, &work, &s).await?;

    // Medians over the repetitions.
    let storm_set = |key: &str, size: usize, runs: Vec<(Timing, Timing)>| {
        let (runs, second): (Vec<Timing>, Vec<Timing>) = runs.into_iter().unzip();
        StormSet {
            key_type: key.into(),
            identities: size,
            wall_s: median(runs.iter().map(|t| t.wall_s).collect()),
            p50_ms: median(runs.iter().map(|t| t.p50_ms).collect()),
            p99_ms: median(runs.iter().map(|t| t.p99_ms).collect()),
            runs,
            second_stream: second,
        }
    };
    let mut storms = Vec::new();
    let mut floors = Vec::new();
    let mut ratios = Vec::new();
    let mut points = Vec::new();
    for &size in &[s.m, s.large] {
        let runs: Vec<(Timing, Timing)> = storm_runs
            .iter()
            .filter(|(n, ..)| *n == size)
            .map(|(_, a, b)| (a.clone(), b.clone()))
            .collect();
        let set = storm_set("ec-p256", size, runs);
        let fruns: Vec<Timing> = floor_runs
            .iter()
            .filter(|(n, _)| *n == size)
            .map(|(_, t)| t.clone())
            .collect();
        let fset = FloorSet {
            identities: size,
            concurrency: CA_MAX_CONCURRENCY,
            wall_s: median(fruns.iter().map(|t| t.wall_s).collect()),
            p50_ms: median(fruns.iter().map(|t| t.p50_ms).collect()),
            p99_ms: median(fruns.iter().map(|t| t.p99_ms).collect()),
            runs: fruns,
        };
        ratios.push(report::Ratio {
            identities: size,
            storm_wall_s: set.wall_s,
            floor_wall_s: fset.wall_s,
            storm_over_floor: set.wall_s / fset.wall_s,
        });
        storms.push(set);
        floors.push(fset);
        for streams in [size, 2 * size] {
            let at: Vec<&MemPoint> = mem_points
                .iter()
                .filter(|p| p.identities == size && p.streams == streams)
                .collect();
            points.push(MemPoint {
                identities: size,
                connections: size,
                streams,
                settled_rss_kib: median(at.iter().map(|p| p.settled_rss_kib as f64).collect())
                    as u64,
                peak_rss_kib: median(at.iter().map(|p| p.peak_rss_kib as f64).collect()) as u64,
            });
        }
    }
    storms.push(storm_set("rsa-2048", s.rsa, rsa_runs));
    let mut all_points = vec![idle];
    all_points.extend(points.iter().copied());
    let fit = report::fit(&all_points);

    let load_after = load_average();
    let mut report = Report {
        harness: report::Harness {
            mode: if quick { "quick".into() } else { "full".into() },
            identities: s.m,
            large_identities: s.large,
            rsa_identities: s.rsa,
            repetitions: s.reps,
            ca_max_concurrency: CA_MAX_CONCURRENCY,
            storm_generator: format!(
                "Rust tonic client on the harness's own {cores}-thread runtime: one HTTP/2 connection per identity, \
                 StreamSecrets default then ROOTCA, each response ACKed, every request with the node Envoy sends"
            ),
            envoy_node_bytes,
            cached_generator: format!("{h2load_version}, one thread"),
            agent_log_level: LOG_LEVEL.into(),
            duration_s: started.elapsed().as_secs_f64(),
        },
        machine: report::Machine {
            cores,
            cpu_model: cpu_model(),
            kernel: command_line("uname", &["-r"]),
            memory_mib: mem_total_mib(),
            load_before,
            load_after,
        },
        versions: report::Versions {
            node_agent: command_line(&bin.display().to_string(), &["--version"]),
            git_commit: command_line("git", &["-C", &workspace_root().display().to_string(), "rev-parse", "HEAD"]),
            rustc: command_line("rustc", &["--version"]),
            openbao: format!("OpenBao {openbao}"),
            bao_agent: peer::bao_version(&bao_bin),
            h2load: h2load_version.clone(),
            envoy: envoy_version,
        },
        storms,
        floors,
        storm_over_floor: ratios,
        cached: report::Cached {
            generator: format!("{h2load_version}, one thread, over the Unix socket"),
            fetch_secrets,
            new_stream,
        },
        memory: report::Memory {
            idle,
            points,
            fit,
        },
        // Every repetition's count: the goals hold only if each run met them.
        vault_load: loads,
        peer: report::Peer {
            rss_ratio: node_agent.settled_rss_kib as f64 / bao_agent.settled_rss_kib as f64,
            first_cert_ratio: node_agent.first_cert_ms / bao_agent.first_cert_ms,
            bao_agent,
            node_agent,
        },
        goals: Vec::new(),
    };
    report.judge();
    std::fs::create_dir_all(&out)?;
    let path = out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", report.markdown());
    println!("report: {}", path.display());
    let loaded = report.machine.load_before[0].max(report.machine.load_after[0]);
    if loaded > 0.5 * cores as f64 {
        println!(
            "note: the machine was busy (load average up to {loaded:.1} on {cores} cores): these figures were taken under load"
        );
    }
    Ok(())
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

/// The agent's settings for the benchmark: the tutorial's, the CA
/// concurrency fixed, and the bounds on identities, connections and streams
/// sized for the storm (their defaults suit a node of ~1000 Envoys).
fn agent_env(v: &VaultBench, key: KeyType, max_identities: usize) -> Vec<(String, String)> {
    let mut env = v.agent_env();
    for (k, val) in [
        ("LOG_LEVEL", LOG_LEVEL.to_string()),
        ("KEY_TYPE", key.as_str().to_string()),
        ("CA_MAX_CONCURRENCY", CA_MAX_CONCURRENCY.to_string()),
        ("MAX_IDENTITIES", (max_identities + 256).to_string()),
        ("SDS_MAX_CONNECTIONS", (max_identities + 256).to_string()),
        ("SDS_MAX_STREAMS", (2 * max_identities + 2048).to_string()),
    ] {
        env.push((k.to_string(), val));
    }
    env.extend(EXTRA_ENV.get().into_iter().flatten().cloned());
    env
}

async fn memory_only(v: &VaultBench, bin: &Path, work: &Path, s: &Sizes) -> anyhow::Result<()> {
    let mut points = vec![idle_memory(v, bin, work).await?];
    for size in [s.m, s.large] {
        let (.., p, _) = storm(v, bin, work, 0, size, KeyType::EcP256).await?;
        points.extend(p);
    }
    let f = report::fit(&points);
    println!("| identities | streams | settled RSS | peak RSS |\n|---|---|---|---|");
    for p in &points {
        println!(
            "| {} | {} | {:.1} MiB | {:.1} MiB |",
            p.identities,
            p.streams,
            p.settled_rss_kib as f64 / 1024.0,
            p.peak_rss_kib as f64 / 1024.0
        );
    }
    println!(
        "fit: {:.1} KiB per identity, {:.1} KiB per stream, base {:.1} MiB (worst residual {:.0} KiB)",
        f.per_identity_kib,
        f.per_stream_kib,
        f.base_kib / 1024.0,
        f.max_residual_kib
    );
    Ok(())
}

async fn idle_memory(v: &VaultBench, bin: &Path, work: &Path) -> anyhow::Result<MemPoint> {
    let agent =
        procs::AgentProc::start(bin, work, "idle", &agent_env(v, KeyType::EcP256, 1000)).await?;
    let rss = procs::settled(agent.pid(), Duration::from_secs(1), Duration::from_secs(5)).await;
    agent.stop();
    Ok(MemPoint {
        identities: 0,
        connections: 0,
        streams: 0,
        settled_rss_kib: rss.rss_kib,
        peak_rss_kib: rss.hwm_kib,
    })
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

async fn floor(v: &VaultBench, rep: usize, size: usize) -> anyhow::Result<Timing> {
    let names = names(&format!("f{rep}m{size}"), size);
    let jwts = v.mint(&names);
    let csrs: Vec<String> = tokio::task::spawn_blocking(move || {
        names
            .iter()
            .map(|n| {
                let key = PrivateKey::generate(KeyType::EcP256)?;
                key.csr_pem(&SpiffeId(vault::spiffe_id(n)))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    let t = storm::floor(
        &v.addr(),
        &v.ca_pem_path(),
        &jwts,
        &csrs,
        CA_MAX_CONCURRENCY,
    )
    .await?;
    eprintln!("bench: floor   M={size:<5} {:.2} s", t.wall_s);
    Ok(t)
}

/// A fresh agent; `size` workloads connect, then all open their `default`
/// stream at once (the storm), then their `ROOTCA` stream. Memory is read
/// after each, and Vault's load counted from the audit log.
async fn storm(
    v: &VaultBench,
    bin: &Path,
    work: &Path,
    rep: usize,
    size: usize,
    key: KeyType,
) -> anyhow::Result<(Timing, Timing, Vec<MemPoint>, audit::VaultLoad)> {
    let tag = format!(
        "s{rep}m{size}{}",
        if key == KeyType::EcP256 { "" } else { "rsa" }
    );
    let names = names(&tag, size);
    let jwts = v.mint(&names);
    let mut agent = procs::AgentProc::start(bin, work, &tag, &agent_env(v, key, size)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let workloads = storm::connect_all(&agent.socket, &names, &jwts).await?;
    let mark = audit::mark(&v.audit_log());
    let (workloads, first) = storm::open_all(workloads, "default")
        .await
        .with_context(|| format!("storm of {size}; agent log:\n{}", agent.log_tail()))?;
    eprintln!(
        "bench: storm   M={size:<5} {:.2} s ({}), p50 {:.0} ms, p99 {:.0} ms",
        first.wall_s,
        key.as_str(),
        first.p50_ms,
        first.p99_ms
    );
    let point = |rss: procs::Rss, streams| MemPoint {
        identities: size,
        connections: size,
        streams,
        settled_rss_kib: rss.rss_kib,
        peak_rss_kib: rss.hwm_kib,
    };
    let one = point(
        procs::settled(
            agent.pid(),
            Duration::from_millis(500),
            Duration::from_secs(5),
        )
        .await,
        size,
    );
    let (workloads, second) = storm::open_all(workloads, "ROOTCA")
        .await
        .with_context(|| format!("second streams of {size}; agent log:\n{}", agent.log_tail()))?;
    let two = point(
        procs::settled(
            agent.pid(),
            Duration::from_millis(500),
            Duration::from_secs(5),
        )
        .await,
        2 * size,
    );
    eprintln!(
        "bench: memory  {size} × 1: {:.1} MiB, {size} × 2: {:.1} MiB (peak {:.1} MiB)",
        one.settled_rss_kib as f64 / 1024.0,
        two.settled_rss_kib as f64 / 1024.0,
        two.peak_rss_kib as f64 / 1024.0
    );
    let load = audit::count(
        &v.audit_log(),
        mark,
        vault::AUTH_PATH,
        vault::SIGN_PATH,
        size,
    )?;
    agent.check_alive()?;
    let errors = agent.error_lines();
    if !errors.is_empty() {
        bail!(
            "the agent logged {} errors or warnings, e.g. {}",
            errors.len(),
            errors[0]
        );
    }
    drop(workloads);
    agent.stop();
    Ok((first, second, vec![one, two], load))
}

async fn cached_serving(
    v: &VaultBench,
    bin: &Path,
    work: &Path,
    s: &Sizes,
) -> anyhow::Result<(Vec<h2load::Serving>, Vec<h2load::Serving>)> {
    let agent =
        procs::AgentProc::start(bin, work, "cached", &agent_env(v, KeyType::EcP256, 1000)).await?;
    let jwt = v.mint(&["cached".to_string()]).remove(0);
    // Cache the identity first, and check that a fetch serves it.
    let mut client = sds::connect(&agent.socket).await?;
    let resp = client
        .fetch_secrets(sds::with_jwt(sds::request("default", "warm"), &jwt))
        .await?
        .into_inner();
    anyhow::ensure!(sds::served_identity(&resp)? == vault::spiffe_id("cached"));
    drop(client);
    // FetchSecrets as a small client asks (names only); a new stream as
    // Envoy opens one (with its node).
    let small = work.join("fetch-request.bin");
    h2load::write_body(&small, sds::request_without_node("default"))?;
    let envoy_like = work.join("stream-request.bin");
    h2load::write_body(
        &envoy_like,
        sds::request(
            "default",
            "sidecar~10.0.0.1~h2load.bench~bench.svc.cluster.local",
        ),
    )?;
    let run = h2load::Run {
        socket: &agent.socket,
        jwt: &jwt,
        work,
        agent_pid: agent.pid(),
        duration: s.serve,
        warm_up: s.warm_up,
    };
    let mut fetch = Vec::new();
    let mut streams = Vec::new();
    for (conns, per) in [(1, 1), (10, 10), (100, 10)] {
        let f = run.run(h2load::FETCH, &small, conns, per).await?;
        eprintln!(
            "bench: FetchSecrets {:>4} streams: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
            f.concurrency,
            f.req_per_s,
            f.p50_us / 1e3,
            f.p99_us / 1e3
        );
        fetch.push(f);
        let n = run.run(h2load::STREAM, &envoy_like, conns, per).await?;
        eprintln!(
            "bench: new stream   {:>4} streams: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
            n.concurrency,
            n.req_per_s,
            n.p50_us / 1e3,
            n.p99_us / 1e3
        );
        streams.push(n);
    }
    agent.stop();
    Ok((fetch, streams))
}

fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

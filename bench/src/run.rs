//! One whole run: every measurement in turn, their medians over the
//! repetitions, the machine and versions it ran on, and the report written.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::measure::{floor, idle_memory, memory_only, storm};
use crate::report::{self, median, FloorSet, MemPoint, Report, StormSet};
use crate::serving::cached_serving;
use crate::storm::Timing;
use crate::vault::VaultBench;
use crate::{
    audit, build_agent, envoy_node, h2load, peer, sds, streams, target_dir, workspace_root, Args,
    Sizes, CA_MAX_CONCURRENCY, EXTRA_ENV, LOG_LEVEL,
};
use node_agent::crypto::KeyType;

pub async fn run(args: Args, cores: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let quick = args.quick;
    let m = args.identities.unwrap_or(if quick { 200 } else { 1000 });
    let s = Sizes {
        m,
        large: args.large.unwrap_or(if quick { 1000 } else { 5000 }),
        rsa: args.rsa_identities.unwrap_or(if quick { 50 } else { 200 }),
        reps: args.repetitions.unwrap_or(if quick { 1 } else { 3 }).max(1),
        // 20 h2load runs (10 shapes, floor and agent): --quick keeps them
        // short, yet long enough that a thousand new streams of Envoy's
        // 61 KiB requests complete within the window on a loaded CI machine
        // running the debug build.
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
    let stream_sizes = streams::Sizes {
        streams: args.streams.unwrap_or(if quick { 300 } else { 1000 }),
        per_connection: args.streams_per_connection.max(1),
        // --quick checks that the measurement runs; the full run's median
        // of three is what docs/benchmarks.md records.
        rounds: if quick { 1 } else { 3 },
    };

    // The node a real Envoy sends goes into every request the generators send.
    let (node, envoy_version) = envoy_node::capture(&work).await?;
    let envoy_node_bytes = prost::Message::encoded_len(&node);
    let _ = sds::ENVOY_NODE.set(node.clone());
    eprintln!("bench: {envoy_version}: its node is {envoy_node_bytes} bytes in every request");
    if args.streams_only {
        let m = streams::measure_all(&bin, &work, stream_sizes, &node).await?;
        println!("{}", report::streams_table(&m));
        return Ok(());
    }

    let h2load_version = h2load::version()?;
    let bao_bin = peer::bao_binary()?;
    eprintln!(
        "bench: M={} and {}, RSA {}, {} repetition(s), {} streams per protocol; load average {:?}",
        s.m, s.large, s.rsa, s.reps, stream_sizes.streams, load_before
    );

    let v = VaultBench::start(&work).await?;
    if args.memory_only {
        return memory_only(&v, &bin, &work, &s).await;
    }
    let generator = format!("{h2load_version}, one thread, over the Unix socket");
    if args.serving_only {
        let cached = cached_serving(&v, &bin, &work, &s, generator).await?;
        println!("{}", report::serving_table(&cached));
        println!("{}", report::goals_table(&report::serving_goals(&cached)));
        println!(
            "{} ({}, {}) · {h2load_version} · {cores} cores ({}) · load average before {:?}, after {:?}",
            command_line(&bin.display().to_string(), &["--version"]),
            command_line("git", &["-C", &workspace_root().display().to_string(), "rev-parse", "--short", "HEAD"]),
            bin.display(),
            cpu_model(),
            load_before,
            load_average(),
        );
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

    eprintln!("bench: cached serving (h2load), against the floor");
    let cached = cached_serving(&v, &bin, &work, &s, generator).await?;

    eprintln!("bench: memory per open stream (LocalCA, a fresh agent per protocol)");
    let stream_memory = streams::measure_all(&bin, &work, stream_sizes, &node).await?;

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
            agent_bin: bin.display().to_string(),
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
        cached,
        memory: report::Memory {
            idle,
            points,
            fit,
        },
        streams: stream_memory,
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

//! The measurements a run is made of, each on a fresh agent: idle memory,
//! a floor, a storm (with its memory points and Vault load), and
//! `--memory-only`'s points with their fit. Cached serving is in `serving`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::report::{self, MemPoint};
use crate::storm::{self, Timing};
use crate::vault::{self, VaultBench};
use crate::{audit, procs, Sizes, CA_MAX_CONCURRENCY, EXTRA_ENV, LOG_LEVEL};
use node_agent::crypto::{KeyType, PrivateKey};
use node_agent::identity::SpiffeId;

/// The agent's settings for the benchmark: the tutorial's, the CA
/// concurrency fixed, and the bounds on identities, connections and streams
/// sized for the storm (their defaults suit a node of ~1000 Envoys).
pub fn agent_env(v: &VaultBench, key: KeyType, max_identities: usize) -> Vec<(String, String)> {
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

pub async fn memory_only(v: &VaultBench, bin: &Path, work: &Path, s: &Sizes) -> anyhow::Result<()> {
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

pub async fn idle_memory(v: &VaultBench, bin: &Path, work: &Path) -> anyhow::Result<MemPoint> {
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

pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

pub async fn floor(v: &VaultBench, rep: usize, size: usize) -> anyhow::Result<Timing> {
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
pub async fn storm(
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
    let cpu_before = procs::cpu_time(agent.pid());
    let (workloads, mut first) = storm::open_all(workloads, "default")
        .await
        .with_context(|| format!("storm of {size}; agent log:\n{}", agent.log_tail()))?;
    let cpu = procs::cpu_time(agent.pid()).saturating_sub(cpu_before);
    first.agent_cpu_ms_per_certificate = cpu.as_secs_f64() * 1e3 / size as f64;
    eprintln!(
        "bench: storm   M={size:<5} {:.2} s ({}), p50 {:.0} ms, p99 {:.0} ms, agent CPU {:.3} ms per certificate",
        first.wall_s,
        key.as_str(),
        first.p50_ms,
        first.p99_ms,
        first.agent_cpu_ms_per_certificate
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

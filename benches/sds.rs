//! Speed and memory of the agent, measured on the real binary over its Unix
//! socket with the local CA (so the figures are the agent's own cost, not a
//! CA's). Prints figures; asserts nothing. Run: `cargo bench --bench sds`.
//!
//! - cold issue: many identities asking for their first certificate at once
//!   (key generation, CSR, signing, checks, SDS encoding);
//! - warm fetch: FetchSecrets served from the cache;
//! - memory: the agent's resident set per cached identity, per open stream
//!   (opened as Envoy opens them: a connection each, every request carrying
//!   a 60 KiB node) and per idle connection; and from these, the worst case
//!   under the default SDS caps.

#[path = "../tests/support/sds_client.rs"]
#[allow(dead_code)]
mod sds_client;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sds_client::*;
use tokio_stream::StreamExt;

const CONCURRENCY: usize = 32;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn start_agent(dir: &Path, key_type: &str, max_conc: &str) -> Child {
    let socket = dir.join("sock");
    let child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .env_clear()
        .env("WORKLOAD_UDS_PATH", &socket)
        .env("CA_PROVIDER", "LocalCA")
        .env("KEY_TYPE", key_type)
        .env("CA_MAX_CONCURRENCY", max_conc)
        .env("LOG_LEVEL", "warn")
        .env("STATUS_ADDR", "")
        // The bench presents thousands of JWTs over 32 connections and opens
        // thousands of streams: lift the per-connection login rate and the
        // caps, which are not what is measured.
        .env("SDS_CONNECTION_NEW_JWT_INTERVAL", "0")
        .env("SDS_MAX_CONNECTIONS", "8192")
        .env("SDS_MAX_STREAMS", "8192")
        .stderr(Stdio::null())
        .spawn()
        .expect("start node-agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `n` FetchSecrets for identities `ids(i)` with CONCURRENCY in flight;
/// returns the sorted latencies and the wall time.
async fn fetch_many(
    socket: &Path,
    n: usize,
    ids: impl Fn(usize) -> String,
) -> (Vec<Duration>, Duration) {
    let jwts: Vec<String> = (0..n).map(|i| fake_jwt("bench", &ids(i))).collect();
    let jwts = std::sync::Arc::new(jwts);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (jwts, next, socket) = (jwts.clone(), next.clone(), socket.to_path_buf());
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&socket).await;
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= jwts.len() {
                    return lat;
                }
                let t = Instant::now();
                fetch(&mut client, &["default", "ROOTCA"], &jwts[i])
                    .await
                    .expect("fetch");
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = start.elapsed();
    all.sort();
    (all, wall)
}

fn report(name: &str, lat: &[Duration], wall: Duration) {
    println!(
        "{name:<34} {:>7} req {:>9.0} req/s   p50 {:>8.2} ms   p99 {:>8.2} ms",
        lat.len(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(lat, 0.5).as_secs_f64() * 1e3,
        percentile(lat, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let identities: usize = std::env::var("BENCH_IDENTITIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let warm: usize = std::env::var("BENCH_WARM_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20000);
    let streams: usize = std::env::var("BENCH_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    println!("node-agent SDS benchmark (local CA, {CONCURRENCY} concurrent clients over the Unix socket)");

    for key_type in ["ec-p256", "rsa-2048"] {
        let n = if key_type.starts_with("rsa") {
            identities / 10
        } else {
            identities
        };
        let dir = tempfile::tempdir().unwrap();
        let mut agent = start_agent(dir.path(), key_type, "16");
        let socket = dir.path().join("sock");
        let pid = agent.id();
        let rss0 = rss_kib(pid);
        let (lat, wall) = fetch_many(&socket, n, |i| format!("sa{i}")).await;
        report(&format!("cold issue, {key_type}"), &lat, wall);
        let rss1 = rss_kib(pid);
        println!(
            "{:<34} {rss0} KiB idle, {rss1} KiB with {n} identities: {:.1} KiB per identity",
            "  memory",
            (rss1.saturating_sub(rss0)) as f64 / n as f64
        );
        if key_type == "ec-p256" {
            let (lat, wall) = fetch_many(&socket, warm, |i| format!("sa{}", i % n)).await;
            report("warm fetch (cached), ec-p256", &lat, wall);

            // Streams as Envoy opens them (a connection each, every request
            // with its ~60 KiB node), all of one identity.
            let node = envoy_types::pb::envoy::config::core::v3::Node {
                id: "x".repeat(60 * 1024),
                ..Default::default()
            };
            let jwt = fake_jwt("bench", "sa0");
            let rss_before = rss_kib(pid);
            let mut held = Vec::new();
            let t = Instant::now();
            for _ in 0..streams {
                let mut client = connect(&socket).await;
                let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
                let mut req = request(&["default"], None);
                req.node = Some(node.clone());
                tx.send(req).await.unwrap();
                inbound.next().await.unwrap().unwrap();
                held.push((client, tx, inbound));
            }
            let elapsed = t.elapsed();
            let rss_streams = rss_kib(pid);
            let per_stream = rss_streams.saturating_sub(rss_before) as f64 / streams as f64;
            println!(
                "{:<34} {streams} opened in {:.0} ms; {per_stream:.1} KiB per open stream with its connection",
                "streams (Envoy-like)",
                elapsed.as_secs_f64() * 1e3,
            );
            // Idle connections (no stream).
            let mut idle = Vec::new();
            for _ in 0..streams {
                idle.push(connect(&socket).await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let per_conn = rss_kib(pid).saturating_sub(rss_streams) as f64 / streams as f64;
            println!(
                "{:<34} {per_conn:.1} KiB per idle connection",
                "connections"
            );
            let d = node_agent::config::SdsLimits::default();
            let identities = node_agent::secrets::DEFAULT_MAX_IDENTITIES;
            let per_identity = rss1.saturating_sub(rss0) as f64 / n as f64;
            // Each default stream with its own connection, the connections
            // left idle, every stream's HTTP/2 window full of unread data,
            // the whole budget of partial requests, and the identity cache
            // full.
            let stream_alone = (per_stream - per_conn).max(0.0);
            let worst_kib = rss0 as f64
                + d.max_connections as f64 * per_conn
                + d.max_streams as f64 * (stream_alone + 16.0)
                + (d.max_buffered_request_bytes / 1024) as f64
                + identities as f64 * per_identity;
            println!(
                "{:<34} {:.0} MiB = idle + {} connections + {} streams (+16 KiB unread each) + {} MiB of partial requests + {} identities",
                "worst case, default caps",
                worst_kib / 1024.0,
                d.max_connections,
                d.max_streams,
                d.max_buffered_request_bytes >> 20,
                identities,
            );
            drop(idle);
            drop(held);
        }
        let _ = agent.kill();
        let _ = agent.wait();
    }
}

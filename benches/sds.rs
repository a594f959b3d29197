//! Speed and memory of the agent, measured on the real binary over its Unix
//! socket with the local CA (so the figures are the agent's own cost, not a
//! CA's). Prints figures; asserts nothing. Run: `cargo bench --bench sds`.
//!
//! - cold issue: many identities asking for their first certificate at once
//!   (key generation, CSR, signing, checks, SDS encoding);
//! - warm fetch: FetchSecrets served from the cache;
//! - memory: the agent's resident set per cached identity and per open stream.

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

            // Open streams on one identity and measure what each costs.
            let rss_before = rss_kib(pid);
            let mut client = connect(&socket).await;
            let jwt = fake_jwt("bench", "sa0");
            let mut held = Vec::new();
            let t = Instant::now();
            for _ in 0..streams {
                let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
                tx.send(request(&["default"], None)).await.unwrap();
                inbound.next().await.unwrap().unwrap();
                held.push((tx, inbound));
            }
            let elapsed = t.elapsed();
            let rss_after = rss_kib(pid);
            println!(
                "{:<34} {streams} streams opened in {:.0} ms; {:.1} KiB per open stream",
                "streams (one identity)",
                elapsed.as_secs_f64() * 1e3,
                (rss_after.saturating_sub(rss_before)) as f64 / streams as f64
            );
            drop(held);
        }
        let _ = agent.kill();
        let _ = agent.wait();
    }
}

//! Streams whose clients leave while Vault refuses connections: each stream's
//! first fetch stops with it, so that thousands of open, request, cancel
//! cycles leave open streams, tasks, the CA queue and memory where they were.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::agent::Agent;
use support::attack::{status_kib, RssSampler};
use support::bao::ProxyMode;
use support::sds_client::*;
use support::vault_env::VaultEnv;

/// Cycles of open, request, cancel.
const CYCLES: usize = 5000;
/// Cycles under way at once.
const CONCURRENT: usize = 32;
/// Distinct service accounts the cycles use.
const ACCOUNTS: usize = 64;

/// A gauge of the agent's `/metrics`.
async fn gauge(agent: &Agent, name: &str) -> f64 {
    support::metrics::gauge(&agent.status_url("/metrics"), name).await
}

/// One cycle: a stream asks for `default` with `jwt`, waits `after` (its
/// fetch now fails and waits to be retried), and is cancelled. Every other
/// cycle cancels its stream on a connection that stays open, and the
/// others close their connection with it.
async fn cycle(agent: &Agent, jwt: &str, after: Duration, close_connection: bool) {
    let mut client = connect(&agent.socket).await;
    let (tx, inbound) = open_stream(&mut client, jwt).await;
    tx.send(request(&["default"], None)).await.unwrap();
    tokio::time::sleep(after).await;
    // Dropping the response stream resets it (RST_STREAM CANCEL).
    drop(inbound);
    drop(tx);
    if !close_connection {
        // The connection outlives the cancelled stream a while.
        tokio::time::sleep(after).await;
    }
}

/// Runs `n` cycles, `CONCURRENT` at a time.
async fn cycles(agent: &Arc<Agent>, jwts: &Arc<Vec<String>>, n: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let (agent, jwts, next) = (agent.clone(), jwts.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    let after = Duration::from_millis(20 + (i % 4) as u64 * 10);
                    cycle(&agent, &jwts[i % jwts.len()], after, i % 2 == 0).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
}

/// Waits until no stream is open, the CA queue is empty and, given
/// `tasks_at_most`, no more tasks than that are alive; returns the tasks
/// alive then.
async fn settled(agent: &Agent, tasks_at_most: Option<f64>) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let streams = gauge(agent, "node_agent_sds_streams_open").await;
        let queue = gauge(agent, "node_agent_ca_queue_depth").await;
        let tasks = gauge(agent, "node_agent_tasks_alive").await;
        if streams == 0.0 && queue == 0.0 && tasks_at_most.is_none_or(|most| tasks <= most) {
            return tasks;
        }
        assert!(
            Instant::now() < deadline,
            "20 s after every client left: {streams} streams open, {queue} CA requests queued, \
             {tasks} tasks alive (at most {tasks_at_most:?} expected)\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_streams_leave_nothing_behind_while_vault_refuses_connections() {
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Down).await;
    let agent = Arc::new(Agent::started(&env.agent_env()).await);
    let jwts: Arc<Vec<String>> = Arc::new(
        (0..ACCOUNTS)
            .map(|i| env.jwt("flood", &format!("sa-{i}")))
            .collect(),
    );

    // Warm: the allocator and the runtime have met the load once.
    cycles(&agent, &jwts, 500).await;
    let tasks_before = settled(&agent, None).await;
    let rss_before = status_kib(agent.pid(), "VmRSS:");

    // The positive control: while cycles run, streams are open, their
    // fetches fail against the refused Vault and wait, and tasks run.
    let sampler = RssSampler::start(agent.pid());
    let flood = tokio::spawn({
        let (agent, jwts) = (agent.clone(), jwts.clone());
        async move { cycles(&agent, &jwts, CYCLES).await }
    });
    let (mut most_streams, mut most_tasks) = (0f64, 0f64);
    while !flood.is_finished() {
        most_streams = most_streams.max(gauge(&agent, "node_agent_sds_streams_open").await);
        most_tasks = most_tasks.max(gauge(&agent, "node_agent_tasks_alive").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flood.await.unwrap();
    let peak_mib = sampler.stop();
    assert!(
        most_streams >= 4.0 && most_tasks > tasks_before + 4.0,
        "the flood was not seen: at most {most_streams} streams open and {most_tasks} tasks \
         (from {tasks_before})"
    );
    assert!(
        agent.log().contains("cannot connect"),
        "the fetches did not reach the refusing Vault\n{}",
        agent.log()
    );

    // Every client has left: so have their streams, fetches and tasks.
    let tasks_after = settled(&agent, Some(tasks_before + 2.0)).await;
    let rss_after = status_kib(agent.pid(), "VmRSS:");
    println!(
        "{CYCLES} cycles: at most {most_streams} streams and {most_tasks} tasks; tasks \
         {tasks_before} -> {tasks_after}; RSS {rss_before} -> {rss_after} KiB, peak {peak_mib:.1} MiB"
    );
    assert!(
        rss_after <= rss_before + 2048,
        "RSS grew from {rss_before} KiB to {rss_after} KiB after {CYCLES} cancelled streams"
    );
    assert!(
        peak_mib < 64.0,
        "peak RSS {peak_mib:.1} MiB during the flood"
    );
}

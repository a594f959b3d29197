//! Squatters: pods that take every place they can and prove nothing, and
//! take each one back as soon as the agent frees it. At the default limits,
//! a new workload on a new connection is served within 2 s all the same,
//! and a workload already connected keeps receiving its pushes: what has
//! proven no credential gives its place up first.

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_agent::client::sds as client;
use support::agent::Agent;
use support::attack::*;
use support::sds_client::*;
use tokio::io::AsyncReadExt;

use super::{check_rss, local_agent};

/// How long each attack runs while new workloads arrive.
const ATTACK: Duration = Duration::from_secs(10);
/// A new workload must be served within this, whatever the attack.
const SERVED_WITHIN: Duration = Duration::from_secs(2);

/// A new workload every 0.5 s, each on a new connection, for [`ATTACK`]:
/// the time each took to get its certificate, or why it did not.
async fn new_workloads(agent: &Agent) -> Vec<Result<Duration, String>> {
    let mut took = Vec::new();
    let end = Instant::now() + ATTACK;
    let mut n = 0;
    while Instant::now() < end {
        n += 1;
        let started = Instant::now();
        let jwt = fake_jwt("fresh", &format!("workload-{n}"));
        let attempt = async {
            let mut c = client::connect(&agent.socket)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            client::fetch(&mut c, client::request(&["default"], None), Some(&jwt))
                .await
                .map_err(|e| format!("fetch: {e:?}"))
        };
        took.push(match tokio::time::timeout(SERVED_WITHIN, attempt).await {
            Ok(Ok(resp)) if served_uris(&resp).len() == 1 => Ok(started.elapsed()),
            Ok(Ok(resp)) => Err(format!("unexpected answer {resp:?}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("nothing within {SERVED_WITHIN:?}")),
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    took
}

/// A workload connected before the attack, watching its stream: the pushes
/// it receives while the attack runs (the certificate renews every 2 s).
struct Watcher {
    pushes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    async fn start(agent: &Agent) -> Watcher {
        let mut c = connect(&agent.socket).await;
        let (tx, mut inbound) = open_stream(&mut c, &fake_jwt("connected", "envoy")).await;
        tx.send(request(&["default"], None)).await.unwrap();
        let first = next_within(&mut inbound, SERVED_WITHIN, "first", || agent.log())
            .await
            .unwrap();
        tx.send(request(&["default"], Some(&first))).await.unwrap();
        let pushes = Arc::new(AtomicUsize::new(0));
        let count = pushes.clone();
        let task = tokio::spawn(async move {
            let _keep = (c, &tx);
            while let Some(Ok(resp)) = tokio_stream::StreamExt::next(&mut inbound).await {
                count.fetch_add(1, Ordering::SeqCst);
                if tx.send(request(&["default"], Some(&resp))).await.is_err() {
                    break;
                }
            }
        });
        Watcher { pushes, task }
    }

    fn pushes(&self) -> usize {
        self.pushes.load(Ordering::SeqCst)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `attack` until told to stop, new workloads arriving meanwhile; then
/// checks each was served in time, the watcher was pushed to, and RSS.
async fn under_attack<F, Fut>(name: &str, agent: &Agent, attack: F)
where
    F: Fn(Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = usize> + Send + 'static,
{
    let watcher = Watcher::start(agent).await;
    let stop = Arc::new(AtomicBool::new(false));
    let rss = RssSampler::start(agent.pid());
    let attacking = tokio::spawn(attack(stop.clone()));
    // Let the squatters take every place first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = watcher.pushes();
    let took = new_workloads(agent).await;
    let pushed = watcher.pushes() - before;
    stop.store(true, Ordering::SeqCst);
    let attempts = attacking.await.unwrap();
    let peak = rss.stop();
    let served: Vec<Duration> = took
        .iter()
        .filter_map(|t| t.as_ref().ok().copied())
        .collect();
    let slowest = served.iter().max().copied().unwrap_or_default();
    println!(
        "{name}: {} squatter attempts; {}/{} new workloads served, slowest {slowest:?}; \
         {pushed} pushes to the connected workload",
        attempts,
        served.len(),
        took.len()
    );
    let failed: Vec<&String> = took.iter().filter_map(|t| t.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{name}: {} of {} new workloads not served within {SERVED_WITHIN:?}: {failed:?}\n{}",
        failed.len(),
        took.len(),
        agent.log()
    );
    assert!(
        took.len() >= 10,
        "{name}: only {} workloads tried",
        took.len()
    );
    assert!(
        attempts > 600,
        "{name}: the squatters made only {attempts} attempts: no attack"
    );
    assert!(
        pushed >= 3,
        "{name}: the connected workload received {pushed} pushes in {ATTACK:?} (renewals every 2 s)"
    );
    check_rss(peak, name);
}

fn agent() -> Agent {
    // Default limits; short certificates, so that pushes to the connected
    // workload show it is still served.
    local_agent(&[("SECRET_TTL", "4s")])
}

/// 32 connections × 16 `StreamSecrets` streams, each sending one complete
/// request with a `response_nonce` and no credential; each stream the agent
/// ends is opened again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_a_credential_reopened_as_fast_as_they_end() {
    let agent = agent();
    let socket = agent.socket.clone();
    under_attack("nonce streams without a JWT", &agent, move |stop| {
        let socket = socket.clone();
        async move {
            let attempts = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..32 {
                let Ok(c) = client::connect(&socket).await else {
                    continue;
                };
                for _ in 0..16 {
                    let (mut c, stop, attempts) = (c.clone(), stop.clone(), attempts.clone());
                    tasks.push(tokio::spawn(async move {
                        while !stop.load(Ordering::SeqCst) {
                            attempts.fetch_add(1, Ordering::SeqCst);
                            let Ok((tx, mut inbound)) = client::open_stream(&mut c, None).await
                            else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            let mut req = request(&["default"], None);
                            req.response_nonce = "1".into();
                            let _ = tx.send(req).await;
                            // Held until the agent ends it (or the attack ends).
                            loop {
                                tokio::select! {
                                    _ = tokio_stream::StreamExt::next(&mut inbound) => break,
                                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                                        if stop.load(Ordering::SeqCst) {
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                    }));
                }
            }
            for t in tasks {
                let _ = t.await;
            }
            attempts.load(Ordering::SeqCst)
        }
    })
    .await;
}

/// 600 connections that never send the HTTP/2 preface, each opened again as
/// soon as the agent closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_preface_reopened_as_fast_as_they_close() {
    let agent = agent();
    let socket = agent.socket.clone();
    under_attack("connections without a preface", &agent, move |stop| {
        let socket = socket.clone();
        async move {
            let attempts = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..600)
                .map(|_| {
                    let (socket, stop, attempts) = (socket.clone(), stop.clone(), attempts.clone());
                    tokio::spawn(async move {
                        while !stop.load(Ordering::SeqCst) {
                            attempts.fetch_add(1, Ordering::SeqCst);
                            let Ok(mut s) = tokio::net::UnixStream::connect(&socket).await else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            // Held until the agent closes it (or the attack ends).
                            let mut buf = [0u8; 256];
                            loop {
                                tokio::select! {
                                    r = s.read(&mut buf) => match r {
                                        Ok(0) | Err(_) => break,
                                        Ok(_) => {}
                                    },
                                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                                        if stop.load(Ordering::SeqCst) {
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
            attempts.load(Ordering::SeqCst)
        }
    })
    .await;
}

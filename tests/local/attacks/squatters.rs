//! Squatters: pods that take every place they can and prove nothing, and
//! take each one back as soon as the agent frees it. At the default limits,
//! a new workload on a new connection is served within 2 s all the same,
//! and a workload already connected keeps receiving its pushes: what has
//! proven no credential gives its place up first. The attacks: streams that
//! send a nonce and no JWT, connections that never send the HTTP/2 preface,
//! and streams with a JWT that announce a 255 KiB request and never send it.

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
async fn under_attack<F, Fut>(name: &str, agent: &Agent, min_attempts: usize, attack: F)
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
        attempts >= min_attempts,
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
    under_attack("nonce streams without a JWT", &agent, 600, move |stop| {
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
    under_attack("connections without a preface", &agent, 600, move |stop| {
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

/// The raw frames that open stream `id` with a well-formed JWT in its
/// metadata and send only the 5-byte gRPC prefix of a 255 KiB message:
/// HEADERS, then DATA holding the prefix, neither ending the stream.
fn prefix_only_stream(id: u32, jwt: &str) -> Vec<u8> {
    let mut out = h2_headers_with_jwt(id, jwt);
    let announced: u32 = 255 * 1024;
    let mut prefix = vec![0u8];
    prefix.extend(announced.to_be_bytes());
    // DATA, no flags.
    out.extend([0, 0, 5, 0, 0]);
    out.extend(id.to_be_bytes());
    out.extend(prefix);
    out
}

/// 2 connections × 16 `StreamSecrets` streams, each with a well-formed JWT
/// in its metadata and sending only the prefix of a 255 KiB message and
/// nothing more; each stream the agent ends is opened again at once, and
/// each connection it closes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_announcing_large_messages_that_never_come() {
    use tokio::io::AsyncWriteExt;
    let agent = agent();
    let socket = agent.socket.clone();
    under_attack("prefixes of 255 KiB messages", &agent, 64, move |stop| {
        let socket = socket.clone();
        async move {
            let attempts = Arc::new(AtomicUsize::new(0));
            let tasks: Vec<_> = (0..2)
                .map(|_| {
                    let (socket, stop, attempts) = (socket.clone(), stop.clone(), attempts.clone());
                    tokio::spawn(async move {
                        while !stop.load(Ordering::SeqCst) {
                            let Ok(mut s) = tokio::net::UnixStream::connect(&socket).await else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            let jwt = fake_jwt("squatter", "envoy");
                            let mut out = h2_open_stream_bytes()[..24 + 9].to_vec();
                            let mut next_id = 1u32;
                            for _ in 0..16 {
                                out.extend(prefix_only_stream(next_id, &jwt));
                                next_id += 2;
                                attempts.fetch_add(1, Ordering::SeqCst);
                            }
                            if s.write_all(&out).await.is_err() {
                                continue;
                            }
                            // Each stream the agent ends is opened again; the
                            // agent's SETTINGS and PINGs are answered. When the
                            // agent stops reading the connection (its requests
                            // wait for budget), the squatter reconnects.
                            while !stop.load(Ordering::SeqCst) {
                                let mut head = [0u8; 9];
                                let read = tokio::select! {
                                    r = s.read_exact(&mut head) => r.is_ok(),
                                    _ = async {
                                        while !stop.load(Ordering::SeqCst) {
                                            tokio::time::sleep(Duration::from_millis(200)).await;
                                        }
                                    } => false,
                                };
                                if !read {
                                    break;
                                }
                                let len =
                                    u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                                let (kind, flags) = (head[3], head[4]);
                                let mut payload = vec![0u8; len];
                                let body = tokio::time::timeout(
                                    Duration::from_secs(1),
                                    s.read_exact(&mut payload),
                                );
                                if !matches!(body.await, Ok(Ok(_))) {
                                    break;
                                }
                                let reply = match (kind, flags & 0x1) {
                                    // SETTINGS: acknowledged.
                                    (0x4, 0) => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                                    // PING: answered.
                                    (0x6, 0) => {
                                        let mut r = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                                        r.extend(&payload);
                                        r
                                    }
                                    // RST_STREAM, or the end of a response.
                                    (0x3, _) | (0x1, 1) | (0x0, 1) => {
                                        attempts.fetch_add(1, Ordering::SeqCst);
                                        let open = prefix_only_stream(next_id, &jwt);
                                        next_id += 2;
                                        open
                                    }
                                    _ => Vec::new(),
                                };
                                if !reply.is_empty() {
                                    let sent = tokio::time::timeout(
                                        Duration::from_secs(1),
                                        s.write_all(&reply),
                                    );
                                    if !matches!(sent.await, Ok(Ok(()))) {
                                        break;
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

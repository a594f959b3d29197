//! The status port held by other clients: kubelet's probes are still
//! answered, at the default bounds, while keep-alive connections hold every
//! ordinary place (twice over) and slow connections fill the pending ones;
//! and each of the port's bounds is a setting.

use crate::support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::attack::{status_kib, RssSampler};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::{get, local_agent};

/// What kubelet sends: a new connection per probe, closed after the answer.
fn probe(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 10.0.0.1:15020\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\nConnection: close\r\n\r\n")
}

const ORDINARY: &[u8] = b"GET /nope HTTP/1.1\r\nHost: status\r\n\r\n";
/// The same, asking the server to close after the answer.
const ORDINARY_ONCE: &[u8] = b"GET /nope HTTP/1.1\r\nHost: status\r\nConnection: close\r\n\r\n";

/// Sends `request` on a new connection; the status code and body of the
/// answer, read until the server closes, and how long that took; or what
/// went wrong, when no answer came within `within`.
async fn ask(
    addr: &str,
    request: &[u8],
    within: Duration,
) -> Result<(u16, String, Duration), String> {
    ask_from(LOOPBACK, addr, request, within).await
}

/// The attackers' address; kubelet asks from another (the node's).
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const KUBELET: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// [`ask`] from the address `from`.
async fn ask_from(
    from: Ipv4Addr,
    addr: &str,
    request: &[u8],
    within: Duration,
) -> Result<(u16, String, Duration), String> {
    let started = Instant::now();
    let exchange = async {
        let socket = TcpSocket::new_v4().map_err(|e| format!("no socket: {e}"))?;
        socket
            .bind(SocketAddr::from((from, 0)))
            .map_err(|e| format!("cannot bind {from}: {e}"))?;
        let mut s = socket
            .connect(addr.parse().unwrap())
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        s.write_all(request)
            .await
            .map_err(|e| format!("cannot send: {e}"))?;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        Ok::<_, String>(answer)
    };
    let answer = tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| format!("no answer within {within:?}"))??;
    let text = String::from_utf8_lossy(&answer).to_string();
    let unanswered = || format!("closed after {:?} with {text:?}", started.elapsed());
    let code = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(unanswered)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .ok_or_else(unanswered)?;
    Ok((code, body, started.elapsed()))
}

/// Reads one answer off a kept-alive connection: its status code, or
/// `None` once the server has closed it.
async fn read_answer(s: &mut TcpStream) -> Option<u16> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).await.ok().filter(|n| *n > 0)?;
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while got.len() < head_end + length {
        let n = s.read(&mut buf).await.ok().filter(|n| *n > 0)?;
        got.extend_from_slice(&buf[..n]);
    }
    head.get(9..12)?.parse().ok()
}

/// Holds an ordinary place with a kept-alive connection, asking again every
/// second (within STATUS_HEADER_TIMEOUT); when refused, tries again.
/// `holding` counts the places held.
async fn keep_alive_holder(addr: String, stop: Arc<AtomicBool>, holding: Arc<AtomicUsize>) {
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    while !stop.load(Ordering::SeqCst) {
        pace.tick().await;
        let Ok(mut s) = TcpStream::connect(&addr).await else {
            continue;
        };
        if s.write_all(ORDINARY).await.is_err() || read_answer(&mut s).await != Some(404) {
            continue;
        }
        holding.fetch_add(1, Ordering::SeqCst);
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if s.write_all(ORDINARY).await.is_err() || read_answer(&mut s).await != Some(404) {
                break;
            }
        }
        holding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends a request head a header line at a time, never ending it, and
/// reconnects when the server closes it. `closed` counts those closes.
async fn slow_header_holder(addr: String, stop: Arc<AtomicBool>, closed: Arc<AtomicUsize>) {
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    while !stop.load(Ordering::SeqCst) {
        pace.tick().await;
        let Ok(mut s) = TcpStream::connect(&addr).await else {
            continue;
        };
        if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: status\r\n")
            .await
            .is_err()
        {
            continue;
        }
        let mut trickle = tokio::time::interval(Duration::from_millis(300));
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                r = s.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { break },
                _ = trickle.tick() => if s.write_all(b"X-Slow: 1\r\n").await.is_err() { break },
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
        }
        closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Kubelet's probes (from the node's address, here 127.0.0.2) are answered
/// at once while, from another address, 64 keep-alive connections (twice
/// STATUS_MAX_CONNECTIONS) hold or wait for every ordinary place and 128
/// connections that never finish their head (twice
/// STATUS_MAX_PENDING_CONNECTIONS) keep the pending ones full, reconnecting
/// as they are closed. The positive control, in the same attack: a new
/// ordinary request is refused naming the bound. The agent's resident set
/// stays bounded meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_answered_while_every_other_place_is_held() {
    let agent = local_agent(&[]);
    let addr = agent.status_addr.clone();
    let within = Duration::from_secs(1); // kubelet's default timeoutSeconds
    let (code, _, _) = ask(&addr, probe("/healthz/live").as_bytes(), within)
        .await
        .expect("answered before the attack");
    assert_eq!(code, 200);

    let baseline_kib = status_kib(agent.pid(), "VmRSS:");
    let rss = RssSampler::start(agent.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for _ in 0..64 {
        attackers.push(tokio::spawn(keep_alive_holder(
            addr.clone(),
            stop.clone(),
            holding.clone(),
        )));
    }
    for _ in 0..128 {
        attackers.push(tokio::spawn(slow_header_holder(
            addr.clone(),
            stop.clone(),
            closed.clone(),
        )));
    }

    // The attack holds every ordinary place, and slow heads are being closed
    // to admit new connections: a new ordinary request is refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refusal = loop {
        assert!(
            Instant::now() < deadline,
            "the attack never held the port: {} places held, {} slow heads closed\n{}",
            holding.load(Ordering::SeqCst),
            closed.load(Ordering::SeqCst),
            agent.log()
        );
        if holding.load(Ordering::SeqCst) == 32 && closed.load(Ordering::SeqCst) >= 128 {
            if let Ok((503, body, _)) = ask(&addr, ORDINARY, Duration::from_secs(2)).await {
                break body;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refusal.contains("STATUS_MAX_CONNECTIONS=32"), "{refusal}");

    // Kubelet's probes, a new connection each, as kubelet sends them.
    let mut slowest = Duration::ZERO;
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    for i in 0..30 {
        pace.tick().await;
        let path = ["/healthz/live", "/healthz/ready"][i % 2];
        let (code, body, took) = ask_from(KUBELET, &addr, probe(path).as_bytes(), within)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "probe {i} ({path}) while the port is held: {e}\n{}",
                    agent.log()
                )
            });
        assert_eq!(code, 200, "probe {i} ({path}): {body}");
        slowest = slowest.max(took);
    }
    assert_eq!(holding.load(Ordering::SeqCst), 32, "the places stayed held");
    let peak_mib = rss.stop();
    let baseline_mib = baseline_kib as f64 / 1024.0;
    println!("probes answered in at most {slowest:?} while held; resident set {baseline_mib:.1} MiB before, {peak_mib:.1} MiB at most");
    assert!(
        peak_mib < baseline_mib + 8.0,
        "{baseline_mib:.1} MiB -> {peak_mib:.1} MiB"
    );

    let log = agent.log();
    for bound in [
        "limit=STATUS_MAX_CONNECTIONS",
        "limit=STATUS_MAX_PENDING_CONNECTIONS",
    ] {
        assert!(log.contains(bound), "no warning naming {bound}:\n{log}");
    }

    // Once the attack ends, ordinary requests are served again.
    stop.store(true, Ordering::SeqCst);
    for a in attackers {
        a.abort();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = ask(&addr, ORDINARY_ONCE, within).await;
        if a.as_ref().map(|a| a.0) == Ok(404) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ordinary places never freed: {a:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each bound is a setting, and a refusal names it: past
/// STATUS_MAX_CONNECTIONS an ordinary request is answered 503 (a probe is
/// still answered); a head larger than STATUS_MAX_HEADER_BYTES gets 431; a
/// connection gets STATUS_HEADER_TIMEOUT to send its first head (408) and,
/// kept alive, each next one; it lives STATUS_CONNECTION_LIFETIME at most.
#[tokio::test]
async fn the_status_servers_bounds_are_settings() {
    let agent = local_agent(&[
        ("STATUS_MAX_CONNECTIONS", "2"),
        ("STATUS_HEADER_TIMEOUT", "1s"),
        ("STATUS_CONNECTION_LIFETIME", "3s"),
        ("STATUS_MAX_HEADER_BYTES", "8KiB"),
    ]);
    let addr = agent.status_addr.clone();
    let within = Duration::from_secs(3);

    // Two kept-alive connections hold both ordinary places.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(ORDINARY).await.unwrap();
        assert_eq!(read_answer(&mut s).await, Some(404));
        held.push(s);
    }
    let idle = Instant::now();
    // And one that sends nothing, which holds no ordinary place.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let (code, body, _) = ask(&addr, ORDINARY, within).await.expect("answered");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("STATUS_MAX_CONNECTIONS=2"), "{body}");
    let (code, _, _) = ask(&addr, probe("/healthz/live").as_bytes(), within)
        .await
        .expect("answered");
    assert_eq!(code, 200, "a probe has a place of its own");

    // Kept alive and idle, they are closed after STATUS_HEADER_TIMEOUT (not
    // the default 5 s), and their places are free again.
    for s in &mut held {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("an idle connection is closed")
            .ok();
    }
    let idle_for = idle.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_millis(2500),
        "{idle_for:?}"
    );
    assert_eq!(
        ask(&addr, ORDINARY_ONCE, within).await.map(|a| a.0),
        Ok(404)
    );

    // The one that sends nothing is answered 408 after STATUS_HEADER_TIMEOUT.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut answer))
        .await
        .expect("a silent connection is closed")
        .ok();
    let silent_for = idle.elapsed();
    assert!(
        silent_for >= Duration::from_millis(900) && silent_for < Duration::from_millis(2500),
        "{silent_for:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("STATUS_HEADER_TIMEOUT=1s"),
        "{answer}"
    );

    // A head that reaches STATUS_MAX_HEADER_BYTES without ending (the
    // server reads it all, so that its answer is not lost to a reset).
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(8192, b'a');
    let (code, body, _) = ask(&addr, &big, within).await.expect("answered");
    assert_eq!(code, 431, "{body}");
    assert!(body.contains("STATUS_MAX_HEADER_BYTES=8192"), "{body}");

    // A connection that keeps asking is closed after STATUS_CONNECTION_LIFETIME.
    let mut d = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let mut answered = 0;
    let lifetime = loop {
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
        if d.write_all(ORDINARY).await.is_err() {
            break started.elapsed();
        }
        match tokio::time::timeout(Duration::from_secs(3), read_answer(&mut d)).await {
            Ok(None) => break started.elapsed(),
            Ok(Some(code)) => {
                assert_eq!(code, 404);
                answered += 1;
            }
            Err(_) => panic!("no answer"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(answered >= 6, "kept alive: {answered} answers");
    assert!(
        lifetime >= Duration::from_millis(2900) && lifetime < Duration::from_secs(8),
        "{lifetime:?}"
    );
    assert_eq!(get(&agent.status_url("/healthz/live")).await.0, 200);
}

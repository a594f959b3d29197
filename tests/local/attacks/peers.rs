//! One hostile peer against the others: a process (this test binary run
//! again as a child, so that it is a peer of its own under `SDS_PEER=pid`)
//! that opens connections and streams up to its share and past it, and
//! reconnects again and again presenting fresh JWTs, of new identities and
//! of one it has. Meanwhile a workload of another peer (this process), on a
//! new connection each time, is served within 2 s; the hostile peer's
//! refusals name the `SDS_PEER_*` settings; the agent's memory stays
//! bounded. The node-wide bounds are set so that, without the per-peer
//! shares, the hostile peer's proven places would fill them.

use crate::support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use node_agent::client::sds as client;
use support::attack::RssSampler;
use support::sds_client::*;
use tokio::io::AsyncBufReadExt;

use super::{assert_one_warning_per_interval, check_rss, local_agent};

/// How long the hostile peer attacks.
const ATTACK: Duration = Duration::from_secs(8);
/// The other peer's workload must be served within this, each time.
const SERVED_WITHIN: Duration = Duration::from_secs(2);
/// Where the child finds the agent's socket; set only for the child.
const HOSTILE_SOCKET: &str = "NODE_AGENT_TEST_HOSTILE_SOCKET";

/// The shares, and node-wide bounds the hostile peer would fill without
/// them: 12 proven streams over 3 connections fill `SDS_MAX_STREAMS`, and
/// its identities `MAX_IDENTITIES`.
const ENV: &[(&str, &str)] = &[
    ("SDS_PEER", "pid"),
    ("SDS_PEER_MAX_CONNECTIONS", "4"),
    ("SDS_PEER_MAX_STREAMS", "8"),
    ("SDS_PEER_MAX_LOGINS_IN_FLIGHT", "2"),
    ("SDS_PEER_NEW_JWT_BURST", "4"),
    ("SDS_PEER_NEW_JWT_INTERVAL", "10s"),
    ("SDS_PEER_MAX_IDENTITIES", "2"),
    ("SDS_MAX_CONNECTIONS", "8"),
    ("SDS_MAX_STREAMS", "12"),
    ("MAX_IDENTITIES", "4"),
];

/// A JWT the local CA accepts, new each time for the same identity (`n`).
fn jwt(ns: &str, sa: &str, n: usize) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"iss":"kubernetes/serviceaccount","sub":"system:serviceaccount:{ns}:{sa}","kubernetes.io/serviceaccount/namespace":"{ns}","jti":"{n}"}}"#
    ));
    format!("{h}.{p}.c2lnbmF0dXJl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_gets_its_share_and_the_others_are_served() {
    let env: Vec<(&str, &str)> = ENV.to_vec();
    let agent = local_agent(&env);
    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "attacks::peers::hostile_peer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOSTILE_SOCKET, &agent.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // The hostile peer has taken what it can.
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        let mut said = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.ends_with("READY") {
                return;
            }
            said += &line;
            said.push('\n');
        }
        panic!("the hostile peer ended before it was ready:\n{said}");
    });
    ready
        .await
        .unwrap_or_else(|_| panic!("the hostile peer is not ready\n{}", agent.log()));

    // A workload of another peer: one JWT, a new connection each time.
    let legit = fake_jwt("legit", "envoy");
    let mut took = Vec::new();
    let end = Instant::now() + ATTACK - Duration::from_secs(2);
    while Instant::now() < end {
        let t = Instant::now();
        let attempt = async {
            let mut c = client::connect(&agent.socket)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            client::fetch(&mut c, client::request(&["default"], None), Some(&legit))
                .await
                .map_err(|e| format!("fetch: {e:?}"))
        };
        took.push(match tokio::time::timeout(SERVED_WITHIN, attempt).await {
            Ok(Ok(resp)) if served_uris(&resp) == ["spiffe://cluster.local/ns/legit/sa/envoy"] => {
                Ok(t.elapsed())
            }
            Ok(Ok(resp)) => Err(format!("unexpected answer {resp:?}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("nothing within {SERVED_WITHIN:?}")),
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut refused = BTreeMap::new();
    let mut held = 0;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(rest) = line.strip_prefix("REFUSED ") {
            let (setting, n) = rest.split_once(' ').unwrap();
            refused.insert(setting.to_string(), n.parse::<usize>().unwrap());
        } else if let Some(n) = line.strip_prefix("HELD ") {
            held = n.parse().unwrap();
        }
    }
    assert!(
        child.wait().await.unwrap().success(),
        "the hostile peer failed"
    );
    let elapsed = started.elapsed();
    let peak = rss.stop();
    let failed: Vec<&String> = took.iter().filter_map(|t| t.as_ref().err()).collect();
    println!("hostile peer: {held} streams held, refused {refused:?}; other peer: {took:?}");
    assert!(
        failed.is_empty(),
        "{} of {} fetches of the other peer not served within {SERVED_WITHIN:?}: {failed:?}\n{}",
        failed.len(),
        took.len(),
        agent.log()
    );
    assert!(took.len() >= 8, "only {} fetches tried", took.len());
    assert_eq!(held, 8, "the hostile peer holds its share of streams");
    for setting in [
        "SDS_PEER_MAX_CONNECTIONS",
        "SDS_PEER_MAX_STREAMS",
        "SDS_PEER_NEW_JWT_BURST",
        "SDS_PEER_MAX_IDENTITIES",
    ] {
        assert!(
            refused.get(setting).is_some_and(|n| *n > 0),
            "no refusal named {setting}: {refused:?}"
        );
    }
    assert!(
        refused.keys().all(|s| s.starts_with("SDS_PEER_")),
        "the hostile peer met node-wide bounds: {refused:?}"
    );
    check_rss(peak, "a hostile peer");
    assert_one_warning_per_interval(&agent, "SDS_PEER_MAX_CONNECTIONS", elapsed);
    assert_one_warning_per_interval(&agent, "SDS_PEER_NEW_JWT_BURST", elapsed);
}

/// The hostile peer: run only as the child of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the hostile peer of a_hostile_peer_gets_its_share_and_the_others_are_served, run by it"]
async fn hostile_peer() {
    let Some(socket) = std::env::var_os(HOSTILE_SOCKET) else {
        return;
    };
    let socket = std::path::PathBuf::from(socket);
    let refused = Mutex::new(BTreeMap::<String, usize>::new());
    let note = |status: &tonic::Status| {
        let setting = status
            .message()
            .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .find(|w| w.starts_with("SDS_") || w.ends_with("MAX_IDENTITIES"))
            .unwrap_or("other")
            .to_string();
        *refused.lock().unwrap().entry(setting).or_default() += 1;
    };
    let end = Instant::now() + ATTACK;

    // Three connections, four streams each: the first four of new
    // identities (past its share of them), the rest of the first identity
    // (past its share of streams); all it is let have, it holds.
    let mut held = 0;
    let mut conns = Vec::new();
    for conn in 0..3 {
        let mut c = client::connect(&socket).await.unwrap();
        let mut kept = Vec::new();
        for stream in 0..4 {
            let i = conn * 4 + stream;
            let jwt = jwt(
                "hostile",
                &format!("holder-{}", if i < 4 { i } else { 0 }),
                0,
            );
            match client::open_stream(&mut c, Some(&jwt)).await {
                Ok((tx, mut inbound)) => {
                    tx.send(request(&["default"], None)).await.unwrap();
                    match tokio_stream::StreamExt::next(&mut inbound).await {
                        Some(Ok(_)) => held += 1,
                        Some(Err(s)) => note(&s),
                        None => panic!("a stream ended without a status"),
                    }
                    kept.push((tx, inbound));
                }
                Err(s) => note(&s),
            }
        }
        conns.push((c, kept));
    }
    // Connections past its share: their streams are refused.
    let mut extra = Vec::new();
    for _ in 0..3 {
        let mut c = client::connect(&socket).await.unwrap();
        if let Err(s) = client::fetch(
            &mut c,
            request(&["default"], None),
            Some(&jwt("hostile", "holder-0", 0)),
        )
        .await
        {
            note(&s);
        }
        extra.push(c);
    }
    drop(extra);
    println!("READY");

    // Reconnecting, each time with fresh JWTs: of new identities, and new
    // ones of an identity it has; the last connection's streams give it
    // room for them.
    conns.pop();
    let mut n = 0;
    while Instant::now() < end {
        n += 1;
        let Ok(mut c) = client::connect(&socket).await else {
            continue;
        };
        for jwt in [
            jwt("hostile", &format!("new-{n}"), n),
            jwt("hostile", "holder-0", n),
        ] {
            if let Err(s) = client::fetch(&mut c, request(&["default"], None), Some(&jwt)).await {
                note(&s);
            }
        }
        drop(c);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conns);
    println!("HELD {held}");
    for (setting, count) in refused.lock().unwrap().iter() {
        println!("REFUSED {setting} {count}");
    }
}

//! A hostile pod on the node attacks the SDS socket. For each attack:
//! the agent's peak resident memory, sampled from /proc while the attack
//! runs, stays under [`RSS_BOUND_MIB`]; a legitimate workload is served
//! during the attack and after it; and the attacker gets the status
//! docs/failures.md documents.
//!
//! The attacks, by what they aim at: [`streams`] (one connection's streams
//! and what a request may name), [`connections`] (the node-wide caps on
//! connections and streams, peers that go quiet or dead), [`logins`]
//! (identities and forged JWTs that would each cost a CA login),
//! [`malformed`] (bytes that are not gRPC, messages and headers too large),
//! [`squatters`] (places taken by what proves nothing, retaken as fast as
//! they are freed), [`peers`] (one peer past its share of every place,
//! another peer served).
//! This file holds what every attack shares: the agent, the legitimate
//! workload, and the checks on memory and on the agent's warnings.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::agent::Agent;
use support::sds_client::*;

mod connections;
mod logins;
mod malformed;
mod peers;
mod squatters;
mod streams;

/// Every attack below must leave the agent's peak resident set under this
/// (a ceiling of 128 MiB; the agent idles at about 7 MiB).
const RSS_BOUND_MIB: f64 = 40.0;

fn local_agent(extra: &[(&'static str, &str)]) -> Agent {
    let mut env: Vec<(&str, String)> = vec![("CA_PROVIDER", "LocalCA".into())];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    Agent::start(&env)
}

/// A workload fetching its certificate over its own connection, again and
/// again while an attack runs: every fetch must succeed.
struct Legit {
    served: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Legit {
    async fn start(agent: &Agent, jwt: String) -> Legit {
        let socket = agent.socket.clone();
        let served = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let mut client = connect(&socket).await;
        let count = served.clone();
        let task = tokio::spawn(async move {
            while !*stopped.borrow() {
                match fetch(&mut client, &["default", "ROOTCA"], &jwt).await {
                    Ok(resp) if secrets(&resp).len() == 2 => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => return Err(format!("unexpected answer {resp:?}")),
                    Err(e) => return Err(format!("refused during the attack: {e:?}")),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stopped.changed() => {}
                }
            }
            Ok(())
        });
        Legit { served, stop, task }
    }

    /// Stops; panics unless every fetch during the attack succeeded and
    /// there was at least one.
    async fn stop(self, agent: &Agent) -> usize {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await.unwrap() {
            panic!(
                "the legitimate workload was not served: {e}\n{}",
                agent.log()
            );
        }
        let n = self.served.load(Ordering::SeqCst);
        assert!(n > 0, "the legitimate workload was never served");
        n
    }
}

/// After the attack, a new workload connection is served.
async fn served_after(agent: &Agent) {
    let mut client = connect(&agent.socket).await;
    let resp = fetch(&mut client, &["default"], &fake_jwt("after", "attack"))
        .await
        .unwrap_or_else(|e| panic!("not served after the attack: {e:?}\n{}", agent.log()));
    assert_eq!(
        served_uris(&resp),
        ["spiffe://cluster.local/ns/after/sa/attack"]
    );
}

fn check_rss(peak: f64, attack: &str) {
    println!("{attack}: peak RSS {peak:.1} MiB");
    assert!(
        peak < RSS_BOUND_MIB,
        "{attack}: the agent's RSS peaked at {peak:.1} MiB, over {RSS_BOUND_MIB} MiB"
    );
}

/// Warnings logged for `limit`: at most one per 10 s interval.
fn assert_one_warning_per_interval(agent: &Agent, limit: &str, elapsed: Duration) {
    let log = agent.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&format!("limit={limit}")))
        .count();
    assert!(warnings >= 1, "no warning for {limit}\n{log}");
    let allowed = 1 + elapsed.as_secs() as usize / 10;
    assert!(
        warnings <= allowed,
        "{warnings} warnings for {limit} in {elapsed:?} (one per 10 s)"
    );
}

/// Lines of the log containing `needle`: at most one per 10 s interval.
fn assert_throttled(agent: &Agent, needle: &str, elapsed: Duration) {
    let log = agent.log();
    let lines = log.lines().filter(|l| l.contains(needle)).count();
    assert!(lines >= 1, "no line with {needle:?}\n{log}");
    let allowed = 1 + elapsed.as_secs() as usize / 10;
    assert!(
        lines <= allowed,
        "{lines} lines with {needle:?} in {elapsed:?} (one per 10 s)"
    );
}

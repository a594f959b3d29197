//! The agent against a real three-node OpenBao Raft cluster (every process on
//! loopback): pointed at a standby, it follows the standby's redirects to the
//! active node, and it rides out the death of the active node while hundreds
//! of workloads are waiting for their first certificate.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::agent::Agent;
use support::bao::{setup_tutorial_with, TutorialOptions};
use support::k8s::start_token_review;
use support::raft::RaftCluster;
use support::sds_client::*;
use support::vault_env::{issuer, TRUST_DOMAIN};
use support::vault_front::{FrontOptions, VaultFront};

/// Identities fetched while the leader dies.
const IDENTITIES: usize = 300;
/// Client connections they are spread over: one per workload, as each
/// Envoy's `google_grpc` SDS stream opens its own (and as node-agent bounds
/// the streams and new JWTs of one connection).
const CONNECTIONS: usize = IDENTITIES;

fn agent_env(vault: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CA_PROVIDER", "VaultCA".into()),
        ("VAULT_ADDR", vault.into()),
        ("VAULT_AUTH_PATH", "auth/kubernetes/login".into()),
        ("VAULT_ROLE", "istio-cert".into()),
        ("VAULT_SIGN_CSR_PATH", "istio_ca/sign/istio-pki-role".into()),
        ("VAULT_REQUEST_TIMEOUT", "5s".into()),
        ("SECRET_TTL", "1h".into()),
        ("LOG_LEVEL", "info,node_agent::ca=debug".into()),
    ]
}

/// The tutorial's setup on the cluster, as docs/vault-ha.md advises:
/// a `no_store` PKI role (a standby signs by itself) and batch tokens (a
/// login writes nothing to storage).
async fn ha_setup(cluster: &mut RaftCluster, names: &[String]) -> support::k8s::TokenReviewHandle {
    let issuer = issuer();
    let review = start_token_review(&issuer.public_key_pem(), 0)
        .await
        .expect("token review server");
    let mut opts = TutorialOptions::new(&review.url(), TRUST_DOMAIN);
    opts.sa_names = names.to_vec();
    opts.no_store = true;
    opts.token_type = Some("batch".into());
    let leader = cluster.leader().await.expect("a leader");
    setup_tutorial_with(&cluster.nodes[leader], &issuer, &opts)
        .await
        .unwrap_or_else(|e| panic!("setup: {e:#}\n{}", cluster.logs()));
    review
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_redirects_is_followed_to_the_active_node() {
    let mut cluster = RaftCluster::start(3).await.expect("raft cluster");
    let _review = ha_setup(&mut cluster, &["httpbin".to_string()]).await;
    let leader = cluster.leader().await.unwrap();
    let standby = cluster.standby().await.unwrap();

    // A front that asks the standby not to forward (Vault's
    // `X-Vault-No-Request-Forwarding`), so the standby answers what it cannot
    // serve itself with a real 307 to the active node, which reaches the agent.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let front = VaultFront::start_with(
        cluster.nodes[standby].addr(),
        no_redirects,
        FrontOptions {
            forward_headers: vec![("X-Vault-No-Request-Forwarding".into(), "true".into())],
            ..FrontOptions::default()
        },
    )
    .await;
    let agent = Agent::started(&agent_env(&front.url)).await;
    let mut client = connect(&agent.socket).await;
    let jwt = issuer().mint("default", "httpbin", Duration::from_secs(3600));
    let resp = fetch(&mut client, &["default", "ROOTCA"], &jwt)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
    assert_eq!(
        served_uris(&resp),
        [format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/httpbin")]
    );
    // The login reached the standby, which redirected it to the active node;
    // the agent followed with the same method and body (the JWT).
    let logins: Vec<_> = front
        .seen()
        .into_iter()
        .filter(|s| s.path == "/v1/auth/kubernetes/login")
        .collect();
    assert_eq!(logins.len(), 1, "{:?}", front.seen());
    let active = cluster.nodes[leader].addr();
    agent
        .log_shows(
            &format!("to={active}/v1/auth/kubernetes/login"),
            Duration::from_secs(5),
        )
        .await;
    assert!(
        agent.log().contains("following Vault's redirect"),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains("VAULT_ADDR is http://"),
        "the agent warns about a clear-text Vault address:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_is_served_when_the_leader_dies_mid_fetch() {
    let mut cluster = RaftCluster::start(3).await.expect("raft cluster");
    let names: Vec<String> = (0..IDENTITIES).map(|i| format!("w{i}")).collect();
    let _review = ha_setup(&mut cluster, &names).await;
    let leader = cluster.leader().await.unwrap();
    let standby = cluster.standby().await.unwrap();
    let agent = Agent::started(&agent_env(&cluster.nodes[standby].addr())).await;

    let issuer = issuer();
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(connect(&agent.socket).await);
    }
    let done = Arc::new(AtomicUsize::new(0));
    // The leader is killed by the fetch that brings the count served to a
    // fifth, at that moment: a test task polling the count could be
    // scheduled late on a loaded machine, while fetches go on being served.
    let leader_pid = cluster.nodes[leader].pid().expect("the leader runs") as libc::pid_t;
    let served_at_kill = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let jwt = issuer.mint("default", name, Duration::from_secs(3600));
        let mut client = clients[i % CONNECTIONS].clone();
        let done = done.clone();
        let served_at_kill = served_at_kill.clone();
        let want = format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{name}");
        tasks.push(tokio::spawn(async move {
            let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
            tx.send(request(&["default"], None)).await.unwrap();
            let first = tokio::time::timeout(
                Duration::from_secs(60),
                tokio_stream::StreamExt::next(&mut inbound),
            )
            .await;
            let result = match first {
                Ok(Some(Ok(resp))) if served_uris(&resp) == [want.clone()] => Ok(()),
                Ok(Some(Ok(resp))) => Err(format!("{want}: served {:?}", served_uris(&resp))),
                Ok(Some(Err(status))) => Err(format!("{want}: gRPC error {status:?}")),
                Ok(None) => Err(format!("{want}: the stream ended")),
                Err(_) => Err(format!("{want}: nothing within 60 s")),
            };
            if done.fetch_add(1, Ordering::SeqCst) + 1 == IDENTITIES / 5 {
                // SAFETY: kill(2) with a pid this test started and a signal.
                unsafe { libc::kill(leader_pid, libc::SIGKILL) };
                served_at_kill.store(done.load(Ordering::SeqCst), Ordering::SeqCst);
            }
            drop(tx);
            result
        }));
    }

    // The leader dies while most workloads still wait for their certificate.
    while served_at_kill.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "too slow before the kill\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill(leader);
    let served_at_kill = served_at_kill.load(Ordering::SeqCst);
    let killed_at = started.elapsed();

    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    let total = started.elapsed();
    let new_leader = cluster
        .wait_new_leader(leader, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    eprintln!(
        "{IDENTITIES} identities: leader n{leader} killed at {killed_at:?} with {served_at_kill} served; \
         all done at {total:?}; new leader n{new_leader}; agent pointed at n{standby}"
    );
    assert!(
        failures.is_empty(),
        "{} of {IDENTITIES} workloads failed: {:?}\nagent:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        agent.log()
    );
    // The agent met the failover: Vault requests failed as the leader died
    // and were retried (a kill after every fetch would show none).
    let m = support::metrics::scrape(&agent.status_url("/metrics"), "prometheus").await;
    let unavailable: f64 = m
        .matching(
            "node_agent_ca_requests_total",
            &[("outcome", "unavailable")],
        )
        .map(|s| s.value)
        .sum();
    let retries: f64 = m
        .matching("node_agent_retries_total", &[])
        .map(|s| s.value)
        .sum();
    let logged = agent.log().matches("retrying in").count();
    eprintln!(
        "the agent met the failover: {unavailable} CA requests unavailable, {retries} retries, \
         {logged} retry lines logged"
    );
    assert!(
        unavailable >= 1.0 && retries >= 1.0 && logged >= 1,
        "the agent never met the failover ({unavailable} CA requests unavailable, {retries} \
         retries, {logged} retry lines): the leader died after the fetches\nagent:\n{}",
        agent.log()
    );
    assert!(
        served_at_kill < IDENTITIES * 2 / 3,
        "the leader died with {served_at_kill} of {IDENTITIES} served: most fetches were still waiting"
    );
    assert_ne!(new_leader, leader);
}

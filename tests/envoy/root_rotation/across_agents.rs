//! A root rotation across two agents, run as docs/trust.md tells an operator
//! to, while Envoys on both nodes keep doing mTLS across them: no request
//! fails at any step.

use crate::support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::Method;
use support::agent::Agent;
use support::bao::PKI_MOUNT;
use support::envoy::*;
use support::mesh::CLIENT_ID;
use support::vault_env::VaultEnv;

use super::{
    default_issuer, make_default, new_root, seen, serial_of, start_fresh_handshake_client,
    token_source, until, Traffic, READY,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_across_two_agents_fails_no_request() {
    let env = VaultEnv::start().await;
    // Node A renews every ~3 s; node B's certificates live 30 s. Both read
    // the mount's roots every second and keep a removed root 30 s (the
    // longest certificate lifetime of the mesh, as docs/trust.md advises).
    let common = [
        ("TRUST_REFRESH_INTERVAL", "1s"),
        ("TRUST_ROOT_RETENTION", "30s"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
    ];
    let with = |ttl: &'static str| {
        let mut v: Vec<(&'static str, &str)> = common.to_vec();
        v.push(("SECRET_TTL", ttl));
        env.agent_env_with(&v)
    };
    let node_a = Agent::started(&with("6s")).await;
    let node_b = Agent::started(&with("30s")).await;
    let logs = || {
        format!(
            "--- node A ---\n{}\n--- node B ---\n{}",
            node_a.log(),
            node_b.log()
        )
    };

    // A serves (httpbin), B is its client (sleep): mTLS across the nodes.
    let dir = tempfile::tempdir().unwrap();
    let (server_port, client_port) = (free_port(), free_port());
    let (backend, _backend) = start_backend("ok").await;
    let server = start_server_envoy(
        token_source(
            dir.path(),
            "a",
            &env.jwt("default", "httpbin"),
            &node_a.socket,
        ),
        server_port,
        backend,
        CLIENT_ID,
    )
    .await
    .unwrap();
    let client = start_fresh_handshake_client(
        token_source(
            dir.path(),
            "b",
            &env.jwt("default", "sleep"),
            &node_b.socket,
        ),
        client_port,
        server_port,
    )
    .await;
    for e in [&server, &client] {
        e.wait_ready(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    }
    let old_issuer = default_issuer(&env).await;
    let old_root = serial_of(&env.setup.root_pem);
    let b_old_leaf = seen(&client).await.leaf;
    let traffic = Traffic::start(client_port, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. A new root, not yet the default: every agent learns it from the
    //    mount and serves both roots before any certificate chains to it.
    let (new_issuer, new_root_pem) = new_root(&env).await;
    let new_root = serial_of(&new_root_pem);
    let both = |t: &Vec<String>| t.contains(&old_root) && t.contains(&new_root);
    until(
        "both Envoys trust both roots",
        Duration::from_secs(15),
        &server,
        &client,
        logs,
        |s, c| both(&s.trusted) && both(&c.trusted),
    )
    .await;

    // 2. The new root becomes the default. A renews onto it within seconds;
    //    B keeps its old-root certificate. Requests go on.
    make_default(&env, &new_issuer).await;
    let a_at_switch = seen(&server).await.leaf;
    until(
        "A serves a new-root certificate while B still presents its old-root one",
        Duration::from_secs(10),
        &server,
        &client,
        logs,
        |s, c| {
            s.leaf != a_at_switch && c.leaf == b_old_leaf && both(&s.trusted) && both(&c.trusted)
        },
    )
    .await;
    assert!(
        traffic.failures().is_empty(),
        "{:?}\n{}",
        traffic.failures(),
        logs()
    );

    // 3. The operator deletes the old issuer. B renews onto the new root at
    //    its own time; the old root stays trusted meanwhile.
    env.bao
        .root(
            Method::DELETE,
            &format!("{PKI_MOUNT}/issuer/{old_issuer}"),
            None,
        )
        .await
        .unwrap();
    until(
        "B renewed onto the new root, the old one still trusted by both",
        Duration::from_secs(30),
        &server,
        &client,
        logs,
        |s, c| c.leaf != b_old_leaf && both(&s.trusted) && both(&c.trusted),
    )
    .await;

    // 4. After the retention, the old root leaves both bundles; requests
    //    still succeed.
    until(
        "the old root left both Envoys' ROOTCA",
        Duration::from_secs(45),
        &server,
        &client,
        logs,
        |s, c| s.trusted == [new_root.clone()] && c.trusted == [new_root.clone()],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = traffic.requests.load(Ordering::SeqCst);
    let failures = traffic.failures();
    drop(traffic);
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:?}\n{}",
        failures.len(),
        logs()
    );
    assert!(requests >= 30, "{requests} requests");

    // Every change was logged with the root's subject, serial and expiry.
    for log in [node_a.log(), node_b.log()] {
        let colon = |hex: &str| {
            hex.as_bytes()
                .chunks(2)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(":")
        };
        let line = |what: &str, serial: &str| {
            log.lines()
                .find(|l| l.contains(what) && l.contains(&colon(serial)))
                .map(str::to_string)
        };
        let added = line("trust bundle (ROOTCA): added root", &new_root)
            .unwrap_or_else(|| panic!("no addition of {new_root} logged\n{log}"));
        assert!(
            added.contains("subject=") && added.contains("expires="),
            "{added}"
        );
        let removed = line("trust bundle (ROOTCA): removed root", &old_root)
            .unwrap_or_else(|| panic!("no removal of {old_root} logged\n{log}"));
        assert!(removed.contains("it left the CA at"), "{removed}");
    }
}

//! Real Envoys on delta SDS sources: with `google_grpc` and with `envoy_grpc`
//! (an agent per pod), mTLS through two rotations seen by both Envoys with
//! every request served, then an agent restart after which Envoy reconnects,
//! reports the versions it holds and gets a new certificate. The delta
//! protocol's rules and bounds, which need no Envoy, are tested in process
//! (`src/sds/tests/`).

use crate::support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::agent::Agent;
use support::envoy::*;
use support::mesh::{Mesh, CLIENT_ID, SERVER_ID};
use support::vault_env::VaultEnv;

/// Sends requests through the mesh for `how_long`, each on a new connection
/// (a new mTLS handshake), recording failures and the leaf serials both
/// Envoys hold.
async fn drive(mesh: &Mesh, how_long: Duration) -> (usize, Vec<String>, Vec<BTreeMap<String, ()>>) {
    let mut seen = vec![BTreeMap::new(), BTreeMap::new()];
    let (mut total, mut failures) = (0, Vec::new());
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        total += 1;
        match http
            .get(format!("http://127.0.0.1:{}/", mesh.client_port))
            .header("connection", "close")
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => failures.push(format!("status {}", r.status())),
            Err(e) => failures.push(e.to_string()),
        }
        for (i, (envoy, id)) in [(&mesh.server, SERVER_ID), (&mesh.client, CLIENT_ID)]
            .into_iter()
            .enumerate()
        {
            for (uri, serial, _) in leaf_certs(&envoy.certs().await) {
                if uri == id {
                    seen[i].insert(serial, ());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (total, failures, seen)
}

/// Both Envoys: no rejected update on either secret, and updates happened.
async fn assert_no_rejections(mesh: &Mesh) {
    for envoy in [&mesh.server, &mesh.client] {
        for name in ["default", "ROOTCA"] {
            let rejected = envoy.stat(&format!("sds.{name}.update_rejected")).await;
            let success = envoy.stat(&format!("sds.{name}.update_success")).await;
            assert_eq!(
                rejected,
                Some(0),
                "sds.{name}.update_rejected\n{}",
                envoy.log_tail()
            );
            assert!(
                success.unwrap_or(0) >= 1,
                "sds.{name}.update_success = {success:?}"
            );
        }
    }
}

/// The mesh on delta sources: mTLS, two rotations seen by both Envoys with
/// every request served, then an agent restart (Envoy reconnects, reports
/// the versions it holds, and gets a new certificate from the new agent).
async fn rotations_and_restart(mesh: &Mesh, agents: &mut [Agent], restart: impl Fn(&mut [Agent])) {
    let resp = mesh.get().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()[HDR_SERVER_SAW_CLIENT_URI].to_str().unwrap(),
        CLIENT_ID
    );
    assert_eq!(
        resp.headers()[HDR_CLIENT_SAW_SERVER_URI].to_str().unwrap(),
        SERVER_ID
    );

    // SECRET_TTL=20s renews at about 10 s: two rotations within ~25 s.
    let logs = |agents: &[Agent]| {
        agents
            .iter()
            .map(Agent::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let (total, failures, seen) = drive(mesh, Duration::from_secs(25)).await;
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {failures:?}\n{}",
        failures.len(),
        logs(agents)
    );
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.len() >= 3,
            "Envoy {i} saw two rotations: {s:?}\n{}",
            logs(agents)
        );
    }
    assert_no_rejections(mesh).await;
    let all = logs(agents);
    assert!(all.contains("SDS delta: push"), "{all}");
    assert!(
        !all.contains("SDS: push"),
        "Envoy used state-of-the-world SDS:\n{all}"
    );

    // Restart the agent(s): Envoy keeps serving on what it has, reconnects
    // and is answered although it reports the versions it holds.
    let before = seen.clone();
    // The restart waits on processes: off the runtime's worker, so that the
    // backend keeps answering meanwhile.
    tokio::task::block_in_place(|| restart(agents));
    let (total, failures, seen) = drive(mesh, Duration::from_secs(8)).await;
    assert!(
        failures.is_empty(),
        "{} of {total} failed across the restart: {failures:?}\n{}",
        failures.len(),
        logs(agents)
    );
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.keys().any(|serial| !before[i].contains_key(serial)),
            "Envoy {i} got a certificate from the restarted agent: before {:?}, after {s:?}\n{}",
            before[i],
            logs(agents)
        );
    }
    assert_no_rejections(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_google_grpc_mtls_rotation_and_agent_restart() {
    let env = VaultEnv::start().await;
    let vars = env.agent_env_with(&[("SECRET_TTL", "20s")]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds").join("uds_path");
    let first = Agent::start_at(&socket, dir.path(), &vars);
    let tokens = tempfile::tempdir().unwrap();
    let source = |name: &str, jwt: String| {
        let token = tokens.path().join(name);
        std::fs::write(&token, jwt).unwrap();
        SdsSource::Delta(Box::new(SdsSource::GoogleGrpc {
            uds_path: socket.clone(),
            token_file: token,
        }))
    };
    let mut agents = vec![first];
    let mesh = Mesh::start_with(
        source("server", env.jwt("default", "httpbin")),
        source("client", env.jwt("default", "sleep")),
        "ok",
        || agents[0].log(),
    )
    .await;
    rotations_and_restart(&mesh, &mut agents, |agents| {
        let st = agents[0].terminate();
        assert!(st.success(), "{}", agents[0].log());
        agents[0] = Agent::start_at(&socket, dir.path(), &vars);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_envoy_grpc_per_pod_agents_mtls_rotation_and_restart() {
    let env = VaultEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pod = |name: &str, sa: &str| {
        let token = dir.path().join(format!("{name}-token"));
        std::fs::write(&token, env.jwt("default", sa)).unwrap();
        let socket = dir.path().join(name).join("uds_path");
        let vars = env.agent_env_with(&[
            ("SECRET_TTL", "20s"),
            ("WORKLOAD_TOKEN_PATH", &token.display().to_string()),
        ]);
        (socket, vars)
    };
    let pods = [pod("server", "httpbin"), pod("client", "sleep")];
    let mut agents: Vec<Agent> = pods
        .iter()
        .map(|(socket, vars)| Agent::start_at(socket, dir.path(), vars))
        .collect();
    let source = |i: usize| {
        SdsSource::Delta(Box::new(SdsSource::EnvoyGrpc {
            uds_path: pods[i].0.clone(),
        }))
    };
    let mesh = Mesh::start_with(source(0), source(1), "ok", || {
        agents
            .iter()
            .map(Agent::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    })
    .await;
    rotations_and_restart(&mesh, &mut agents, |agents| {
        for (i, (socket, vars)) in pods.iter().enumerate() {
            let st = agents[i].terminate();
            assert!(st.success(), "{}", agents[i].log());
            agents[i] = Agent::start_at(socket, dir.path(), vars);
        }
    })
    .await;
}

//! The Istio-shaped mesh at work: while requests go through both Envoys on
//! new connections twice a second, a rotation reaches both Envoys and one
//! node-agent is restarted: no request fails, requests succeed while that
//! agent is down, and the restarted agent serves its Envoy again. Also how
//! the run is observed: the serials Envoy holds and the agent issued, Envoy's
//! SDS streams, the traffic.

use crate::support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::bao::Bao;
use support::cli::{node_agent, settings, vault_vars, write};
use support::envoy::*;
use support::istio::{client_bootstrap, server_bootstrap, Workload, SDS_CLUSTER};
use support::k8s::start_token_review;
use support::vault_env::issuer;

use super::{Pod, Template, READY};

/// Serial numbers as one spelling: lowercase hex, no colons, no leading zeros.
fn serial(s: &str) -> String {
    s.replace(':', "")
        .to_lowercase()
        .trim_start_matches('0')
        .to_string()
}

/// The serial of the leaf certificate naming `id` in an Envoy's `/certs`.
async fn leaf_serial(envoy: &EnvoyProc, id: &str) -> Option<String> {
    leaf_certs(&envoy.certs().await)
        .into_iter()
        .find(|(uri, _, _)| uri == id)
        .map(|(_, s, _)| serial(&s))
}

/// The serials an agent logged as issued (first fetches, not renewals).
fn issued_serials(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("issued workload certificate"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("serial="))
                .map(|s| serial(s.trim_matches('"')))
        })
        .collect()
}

/// The gRPC streams an Envoy opened on `sds-grpc` so far, and how many are
/// open now.
async fn sds_streams(envoy: &EnvoyProc) -> (u64, u64) {
    let stat = |name: &'static str| async move {
        envoy
            .stat(&format!("cluster.{SDS_CLUSTER}.{name}"))
            .await
            .unwrap_or_else(|| panic!("Envoy has no {name} on {SDS_CLUSTER}"))
    };
    (
        stat("upstream_rq_total").await,
        stat("upstream_rq_active").await,
    )
}

/// One request into the client Envoy on a new connection (so a new mTLS
/// handshake): the client identity the server Envoy verified, or the failure.
async fn get_once(port: u16) -> Result<String, String> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    match http
        .get(format!("http://127.0.0.1:{port}/"))
        .header("connection", "close")
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) if r.status() == 200 => Ok(r
            .headers()
            .get(HDR_SERVER_SAW_CLIENT_URI)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()),
        Ok(r) => Err(format!("status {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

/// Requests through both Envoys, each on a new connection, until stopped.
#[derive(Default)]
struct Traffic {
    /// (sent at, outcome): `Ok` with the identity the server Envoy verified.
    results: Mutex<Vec<(Instant, Result<String, String>)>>,
    stop: AtomicBool,
}

impl Traffic {
    fn start(port: u16, every: Duration) -> (Arc<Traffic>, tokio::task::JoinHandle<()>) {
        let t = Arc::new(Traffic::default());
        let task = {
            let t = t.clone();
            tokio::spawn(async move {
                while !t.stop.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    let outcome = get_once(port).await;
                    t.results.lock().unwrap().push((sent, outcome));
                    tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
                }
            })
        };
        (t, task)
    }

    fn ok_between(&self, from: Instant, to: Instant) -> usize {
        self.results
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, r)| *at >= from && *at <= to && r.is_ok())
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_shaped_envoys_do_mtls_through_a_rotation_and_an_agent_restart() {
    let template = Template::load();
    let td = template.trust_domain.as_str();
    assert_ne!(
        td, "cluster.local",
        "the test is about a non-default trust domain"
    );

    // Vault, configured the way docs/istio.md tells an Istio operator to.
    let issuer = issuer();
    let review = start_token_review(&issuer.public_key_pem(), 0)
        .await
        .expect("token review server");
    let bao = Bao::start_tls().await.expect("start OpenBao");
    let dir = tempfile::tempdir().unwrap();
    let reviewer = issuer.mint("kube-system", "vault-auth", Duration::from_secs(86400));
    let setup_args = [
        "vault-setup",
        "--trust-domain",
        td,
        "--audience",
        &template.audience,
        "--kubernetes-host",
        &review.url(),
        "--kubernetes-ca-cert",
        &bao.ca_pem_path().display().to_string(),
        "--token-reviewer-jwt",
        &write(dir.path(), "reviewer.jwt", &reviewer),
        "--bound-namespaces",
        "default,istio-ingress",
        "--bound-service-accounts",
        "httpbin,sleep,istio-ingressgateway",
    ];
    let setup = node_agent(&setup_args, &vault_vars(&bao)).await;
    assert_eq!(setup.code, 0, "{}", setup.both());
    let vault = settings(&setup.stdout);
    // The template carries what vault-setup printed; only Vault's address and
    // CA file differ from cluster to this machine.
    for (k, v) in &vault {
        if k != "VAULT_ADDR" && k != "VAULT_TLS_ROOT_CERT" {
            assert_eq!(
                template.env.get(k),
                Some(v),
                "deploy/istio's template sets {k} as vault-setup printed it"
            );
        }
    }
    assert!(vault.iter().any(|(k, v)| k == "TRUST_DOMAIN" && v == td));

    let jwt = |sa: &str| {
        issuer.mint_for_audiences(
            "default",
            sa,
            Duration::from_secs(3600),
            &[&template.audience],
        )
    };
    let httpbin = Workload {
        app: "httpbin",
        namespace: "default",
        service_account: "httpbin",
        pod: "httpbin-7d4f8c6b9-x2x8k",
        ip: "10.244.0.12",
    };
    let sleep = Workload {
        app: "sleep",
        namespace: "default",
        service_account: "sleep",
        pod: "sleep-5b8d9f7c4-qr5tz",
        ip: "10.244.0.13",
    };
    let (server_id, client_id) = (httpbin.spiffe_id(td), sleep.spiffe_id(td));
    let server_pod = Pod::new(&template, &vault, &jwt("httpbin"));
    let client_pod = Pod::new(&template, &vault, &jwt("sleep"));
    let mut server_agent = server_pod.start_agent().await;
    let client_agent = client_pod.start_agent().await;

    let (server_port, client_port) = (free_port(), free_port());
    let (backend, _backend) = start_backend("hello from httpbin").await;
    let server = EnvoyProc::start_in(
        &server_bootstrap(&httpbin, td, server_port, backend),
        server_pod.root.path(),
    )
    .await
    .unwrap();
    let client = EnvoyProc::start_in(
        &client_bootstrap(&sleep, td, client_port, server_port, &server_id),
        client_pod.root.path(),
    )
    .await
    .unwrap();
    for (envoy, agent) in [(&server, &server_agent), (&client, &client_agent)] {
        envoy
            .wait_ready(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    }

    // mTLS with SPIFFE IDs of the mesh's trust domain, each side checked.
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{client_port}/"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("sleep -> httpbin through both Envoys");
    assert_eq!(resp.status(), 200, "{}", client.log_tail());
    assert_eq!(
        resp.headers()[HDR_SERVER_SAW_CLIENT_URI],
        client_id.as_str()
    );
    assert_eq!(
        resp.headers()[HDR_CLIENT_SAW_SERVER_URI],
        server_id.as_str()
    );
    assert_eq!(resp.text().await.unwrap(), "hello from httpbin");
    // Over the istiod-shaped source: the sds-grpc cluster, no rejection.
    for envoy in [&server, &client] {
        let cx = envoy
            .stat(&format!("cluster.{SDS_CLUSTER}.upstream_cx_total"))
            .await;
        assert!(cx >= Some(1), "SDS went over {SDS_CLUSTER}: {cx:?}");
        for name in ["default", "ROOTCA"] {
            assert!(envoy.stat(&format!("sds.{name}.update_success")).await >= Some(1));
            assert_eq!(
                envoy.stat(&format!("sds.{name}.update_rejected")).await,
                Some(0)
            );
        }
    }

    let (traffic, driver) = Traffic::start(client_port, Duration::from_millis(500));

    // A rotation reaches both Envoys.
    let first = (
        leaf_serial(&server, &server_id).await.unwrap(),
        leaf_serial(&client, &client_id).await.unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let now = (
            leaf_serial(&server, &server_id).await,
            leaf_serial(&client, &client_id).await,
        );
        if now.0.as_ref().is_some_and(|s| *s != first.0)
            && now.1.as_ref().is_some_and(|s| *s != first.1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotation did not reach both Envoys: {first:?} -> {now:?}\nserver agent:\n{}\nclient agent:\n{}",
            server_agent.log(),
            client_agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for agent in [&server_agent, &client_agent] {
        assert!(
            agent.log().contains("renewed workload certificate"),
            "{}",
            agent.log()
        );
    }

    // Each Envoy still has the two streams it opened (`default`, `ROOTCA`):
    // every request after a stream's first, which carries no `node`, was
    // taken like the first, and the rotation came as a push on them.
    for (envoy, agent) in [(&server, &server_agent), (&client, &client_agent)] {
        assert_eq!(
            sds_streams(envoy).await,
            (2, 2),
            "SDS streams were reopened\n{}\n{}",
            envoy.log_tail(),
            agent.log()
        );
    }

    // The server's node-agent restarts: its Envoy keeps its certificate
    // meanwhile, then takes one from the new agent.
    let roots_served = server.stat("sds.ROOTCA.update_success").await.unwrap();
    let stopped = Instant::now();
    server_agent.signal_term();
    let status = server_agent.exited(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}\n{}", server_agent.log());
    let old_log = server_agent.log();
    let before = leaf_serial(&server, &server_id).await.unwrap();
    // Down for a while, as a container kubelet restarts is: no agent, no
    // socket, Envoy retrying.
    assert!(
        !server_pod.socket.exists(),
        "the stopped agent removed its socket"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarting = Instant::now();
    let restarted = server_pod.start_agent().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = loop {
        let issued = issued_serials(&restarted.log());
        let now = leaf_serial(&server, &server_id).await;
        if let Some(s) = now.filter(|s| *s != before && issued.contains(s)) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent never served its Envoy (Envoy has {before}, the agent issued {issued:?})\n{}\n{}",
            restarted.log(),
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Both of its streams (`default`, `ROOTCA`) are back on the new agent;
    // each reconnects on its own back-off.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sds_streams(&server).await.1 < 2
        || server.stat("sds.ROOTCA.update_success").await.unwrap() <= roots_served
    {
        assert!(
            Instant::now() < deadline,
            "{:?}\n{}",
            sds_streams(&server).await,
            server.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = Instant::now();
    // The server's Envoy opened new streams to the new agent (the count
    // above sees reopened streams); the client's, on the other agent, did not.
    let (opened, open) = sds_streams(&server).await;
    assert!(
        opened > 2 && open == 2,
        "{opened} streams opened, {open} open"
    );
    assert_eq!(sds_streams(&client).await, (2, 2));
    assert!(
        !issued_serials(&old_log).contains(&served),
        "served by the new agent"
    );
    // And traffic still flows on it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    traffic.stop.store(true, Ordering::SeqCst);
    driver.await.unwrap();

    let while_down = traffic.ok_between(stopped, restarting);
    let during_restart = traffic.ok_between(stopped, back);
    let results = traffic.results.lock().unwrap().clone();
    let failures: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}\nserver agent:\n{}",
        failures.len(),
        results.len(),
        restarted.log()
    );
    eprintln!(
        "{} requests, {during_restart} of them while the agent restarted ({:?}), {while_down} with no agent; rotation {first:?}, restarted agent served {served}",
        results.len(),
        back - stopped
    );
    assert!(results.len() >= 20, "{} requests", results.len());
    assert!(
        results
            .iter()
            .all(|(_, r)| r.as_deref() == Ok(client_id.as_str())),
        "every request was mTLS as sleep"
    );
    assert!(
        while_down >= 3,
        "{while_down} requests succeeded while no agent ran"
    );
    // The traffic's check can fail: a request nothing answers is one.
    assert!(get_once(free_port()).await.is_err());
    for envoy in [&server, &client] {
        for name in ["default", "ROOTCA"] {
            assert_eq!(
                envoy.stat(&format!("sds.{name}.update_rejected")).await,
                Some(0),
                "{}",
                envoy.log_tail()
            );
        }
    }
}

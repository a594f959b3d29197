//! Rotation against a real OpenBao and real Envoys: renewals pushed before
//! expiry while traffic flows, one sign per rotation, a bounded CA queue,
//! Vault down during a rotation, a CA root change, and an unrenewed
//! certificate. (Streams whose JWT expires: tests/vault/credential_lifetime.rs.)

use crate::support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use support::agent::Agent;
use support::bao::{rotate_root, ProxyMode};
use support::envoy::*;
use support::mesh::{Mesh, CLIENT_ID, SERVER_ID};
use support::sds_client::*;
use support::vault_env::VaultEnv;
use support::vault_front::{Tamper, VaultFront};
use tokio_stream::StreamExt;

const READY: Duration = Duration::from_secs(60);

async fn mesh(env: &VaultEnv, agent: &Agent) -> Mesh {
    Mesh::start(
        &agent.socket,
        &env.jwt("default", "httpbin"),
        &env.jwt("default", "sleep"),
        "ok",
        || agent.log(),
    )
    .await
}

/// What [`drive`] saw.
struct Drive {
    requests: usize,
    failures: Vec<String>,
    /// Serials of the server Envoy's certificate, with first-seen time and expiry.
    serials: BTreeMap<String, (SystemTime, SystemTime)>,
}

/// Sends requests through the mesh for `how_long`, on fresh connections so
/// that every request is a new mTLS handshake, and watches the server
/// Envoy's leaf certificate.
async fn drive(mesh: &Mesh, how_long: Duration) -> Drive {
    let mut serials: BTreeMap<String, (SystemTime, SystemTime)> = BTreeMap::new();
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
        let leaves = leaf_certs(&mesh.server.certs().await);
        for (_, serial, exp) in leaves.into_iter().filter(|(uri, ..)| uri == SERVER_ID) {
            let exp =
                time::OffsetDateTime::parse(&exp, &time::format_description::well_known::Rfc3339)
                    .map(SystemTime::from)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
            serials.entry(serial).or_insert((SystemTime::now(), exp));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Drive {
        requests: total,
        failures,
        serials,
    }
}

/// Each new serial was seen before the previous one expired.
fn assert_renewed_before_expiry(serials: &BTreeMap<String, (SystemTime, SystemTime)>) {
    let mut by_seen: Vec<_> = serials.values().copied().collect();
    by_seen.sort();
    for pair in by_seen.windows(2) {
        let (_, old_exp) = pair[0];
        let (new_seen, _) = pair[1];
        assert!(
            new_seen < old_exp,
            "a new certificate arrived only after the old one expired: {by_seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gets_renewed_certificates_before_expiry_while_traffic_flows() {
    let env = VaultEnv::start().await;
    let agent = Agent::start(&env.agent_env_with(&[("SECRET_TTL", "16s")]));
    let m = mesh(&env, &agent).await;

    let Drive {
        requests: total,
        failures,
        serials,
        ..
    } = drive(&m, Duration::from_secs(30)).await;
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {failures:?}\n{}",
        failures.len(),
        agent.log()
    );
    assert!(total > 50, "{total} requests");
    assert!(
        serials.len() >= 3,
        "at least two renewals seen by Envoy: {serials:?}\n{}",
        agent.log()
    );
    assert_renewed_before_expiry(&serials);

    // One sign per issue or renewal of an identity, never per stream: each
    // identity here has two streams (default and ROOTCA).
    let log = agent.log();
    let issued = log.matches("issued workload certificate").count();
    let renewed = log.matches("renewed workload certificate").count();
    assert_eq!(issued, 2, "{log}");
    assert_eq!(env.count("istio_ca/sign/istio-pki-role"), issued + renewed);
    assert!(
        renewed >= 4,
        "both identities renewed at least twice: {renewed}"
    );
    // One login per JWT at its first fetch, and one at each renewal, which
    // proves the JWT again though its Vault token (1h) is cached.
    assert_eq!(env.count("auth/kubernetes/login"), 2 + renewed);
    drop(m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_envoys_of_one_identity_cost_one_login_and_one_sign_per_rotation() {
    let env = VaultEnv::start().await;
    let agent = Agent::start(&env.agent_env_with(&[("SECRET_TTL", "10s")]));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("sleep-token");
    std::fs::write(&token, env.jwt("default", "sleep")).unwrap();
    let mut envoys = Vec::new();
    for _ in 0..3 {
        let sds = SdsSource::GoogleGrpc {
            uds_path: agent.socket.clone(),
            token_file: token.clone(),
        };
        envoys.push(
            start_client_envoy(sds, free_port(), free_port(), SERVER_ID)
                .await
                .unwrap(),
        );
    }
    for e in &envoys {
        e.wait_ready(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    }
    // Three Envoys, six streams (default and ROOTCA each), one identity.
    let first = leaf_serials(&envoys).await;
    assert!(
        first.windows(2).all(|w| w[0] == w[1]),
        "all Envoys share one certificate: {first:?}"
    );
    assert_eq!(env.count("auth/kubernetes/login"), 1, "{}", agent.log());
    assert_eq!(env.count("istio_ca/sign/istio-pki-role"), 1);

    // Through rotations: every Envoy moves to the same new certificate, and
    // each rotation is one sign and one login (the one JWT, proven again).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = leaf_serials(&envoys).await;
        if now.iter().all(|s| s != &first[0]) && now.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoys never all got the renewed certificate: {now:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = agent.log();
    let rotations = log.matches("renewed workload certificate").count();
    assert!(rotations >= 1);
    assert_eq!(
        env.count("istio_ca/sign/istio-pki-role"),
        1 + rotations,
        "{log}"
    );
    assert_eq!(env.count("auth/kubernetes/login"), 1 + rotations, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_ca_max_concurrency_requests_in_flight() {
    let env = VaultEnv::start().await;
    // A slow front makes requests overlap if the agent lets them.
    let front = VaultFront::start(
        env.bao.addr(),
        env.bao.client().clone(),
        Tamper::None,
        Duration::from_millis(150),
    )
    .await;
    let mut vars: Vec<(&str, String)> = env
        .agent_env()
        .into_iter()
        .filter(|(k, _)| !matches!(*k, "VAULT_ADDR" | "CA_ADDR"))
        .collect();
    vars.push(("VAULT_ADDR", front.url.clone()));
    vars.push(("CA_MAX_CONCURRENCY", "3".into()));
    let agent = Agent::start(&vars);
    // Twelve identities at once (the role accepts these names).
    support::bao::set_k8s_role_accounts(&env.bao, &["*"], &["default"])
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let jwt = env.jwt("default", &format!("sa{i}"));
        let socket = agent.socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&socket).await;
            fetch(&mut c, &["default"], &jwt).await
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
    }
    assert_eq!(env.count("auth/kubernetes/login"), 12);
    assert_eq!(env.count("istio_ca/sign/istio-pki-role"), 12);
    assert_eq!(
        front.max_in_flight(),
        3,
        "the bound is reached and never passed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_during_rotation_keeps_the_old_certificate_until_it_is_back() {
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Up).await;
    let agent = Agent::start(&env.agent_env_with(&[
        ("SECRET_TTL", "30s"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
    ]));
    let m = mesh(&env, &agent).await;
    let first = leaf_certs(&m.server.certs().await);

    env.proxy.as_ref().unwrap().set_up(false).await;
    // Renewal is due ~15 s after issue; it fails while Vault is away.
    let d = drive(&m, Duration::from_secs(17)).await;
    assert!(d.failures.is_empty(), "{:?} of {}", d.failures, d.requests);
    assert_eq!(
        d.serials.keys().collect::<Vec<_>>(),
        [&first[0].1],
        "still the first certificate"
    );
    assert!(
        agent.log().contains("failed to renew the certificate"),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("still serving the current one"));
    assert!(
        !agent.log().contains("ending its streams"),
        "the streams stay open"
    );

    env.proxy.as_ref().unwrap().set_up(true).await;
    let d = drive(&m, Duration::from_secs(10)).await;
    assert!(
        d.failures.is_empty(),
        "{:?} of {}\n{}",
        d.failures,
        d.requests,
        agent.log()
    );
    assert!(
        d.serials.len() >= 2,
        "the renewed certificate arrived: {:?}\n{}",
        d.serials,
        agent.log()
    );
    assert_renewed_before_expiry(&d.serials);
    assert!(d.serials.contains_key(&first[0].1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_change_reaches_envoy_without_a_restart_and_both_roots_stay_trusted() {
    let env = VaultEnv::start().await;
    let agent = Agent::start(&env.agent_env_with(&[("SECRET_TTL", "16s")]));
    let m = mesh(&env, &agent).await;
    let old_root: Vec<String> = ca_serials(&m.server.certs().await);
    assert_eq!(old_root.len(), 1);
    let old_root = old_root[0].clone();
    let leaf = |certs: &serde_json::Value| leaf_certs(certs)[0].1.clone();
    let old_leaves = [leaf(&m.server.certs().await), leaf(&m.client.certs().await)];

    let new_root_pem = rotate_root(&env.bao).await.unwrap();
    let new_root = leaf_facts(&new_root_pem).1.replace(':', "").to_lowercase();
    // Both Envoys must come to hold certificates issued since the rotation
    // (by the new default issuer) and trust both roots at once (a peer on
    // another node may still present an old-root certificate), with traffic
    // working throughout.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut done = true;
        for (envoy, old_leaf) in [(&m.server, &old_leaves[0]), (&m.client, &old_leaves[1])] {
            let certs = envoy.certs().await;
            let trusted = ca_serials(&certs);
            done &= trusted.contains(&old_root)
                && trusted.contains(&new_root)
                && leaf(&certs) != *old_leaf;
        }
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Envoys never held renewed certificates while trusting both roots: server {:?}, client {:?}\n{}",
            m.server.certs().await,
            m.client.certs().await,
            agent.log()
        );
        let r = m.get().await;
        assert_eq!(r.status(), 200, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // What the agent serves now chains to the new root.
    let mut client = connect(&agent.socket).await;
    let resp = fetch(&mut client, &["default"], &env.jwt("default", "httpbin"))
        .await
        .unwrap();
    let chain = tls_certificate(&secrets(&resp)[0]).0;
    assert!(
        signed_by(&chain, &new_root_pem),
        "the renewed leaf is the new root's"
    );
    // The old root stays trusted: Vault still has its issuer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for envoy in [&m.server, &m.client] {
        assert!(ca_serials(&envoy.certs().await).contains(&old_root));
    }
    assert_eq!(m.get().await.status(), 200, "{}", agent.log());
}

/// True when the first certificate of `chain_pem` is signed by `root_pem`'s key.
fn signed_by(chain_pem: &str, root_pem: &str) -> bool {
    let der = |pem: &str| {
        x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    };
    let (leaf, root) = (der(chain_pem), der(root_pem));
    let (leaf, root) = (leaf.parse_x509().unwrap(), root.parse_x509().unwrap());
    leaf.verify_signature(Some(root.public_key())).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_unrenewed_is_logged_with_its_identity() {
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Up).await;
    let agent = Agent::start(&env.agent_env_with(&[("SECRET_TTL", "6s")]));
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &env.jwt("default", "httpbin")).await;
    tx.send(request(&["default"], None)).await.unwrap();
    let first = inbound.next().await.unwrap().unwrap();
    tx.send(request(&["default"], Some(&first))).await.unwrap();
    env.proxy.as_ref().unwrap().set_up(false).await;
    agent.wait_log("still serving the current one", Duration::from_secs(15));
    agent.wait_log("certificate expired at", Duration::from_secs(15));
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("certificate expired at"))
        .unwrap();
    assert!(line.contains("ERROR") && line.contains(SERVER_ID), "{line}");
    // Logged once, not on every retry.
    assert_eq!(log.matches("certificate expired at").count(), 1, "{log}");
    // Vault back: the stream gets a fresh certificate.
    env.proxy.as_ref().unwrap().set_up(true).await;
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(30),
        "no renewal after Vault came back",
        || agent.log(),
    )
    .await
    .unwrap();
    assert_ne!(pushed.version_info, first.version_info);
}

/// The leaf serial each Envoy serves for the client identity.
async fn leaf_serials(envoys: &[EnvoyProc]) -> Vec<String> {
    let mut seen = Vec::new();
    for e in envoys {
        let leaves = leaf_certs(&e.certs().await);
        assert_eq!(leaves.len(), 1, "{leaves:?}");
        assert_eq!(leaves[0].0, CLIENT_ID);
        seen.push(leaves[0].1.clone());
    }
    seen
}

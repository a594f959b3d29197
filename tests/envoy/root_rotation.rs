//! `ROOTCA` is the mesh's trust, not one node's (issue 9): two agents on one
//! real OpenBao, real Envoys doing mTLS across them, a root rotation run as
//! docs/trust.md tells an operator to, and the trust bundle's failure modes.

use crate::support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use support::agent::Agent;
use support::bao::{ProxyMode, PKI_MOUNT};
use support::envoy::*;
use support::mesh::{CLIENT_ID, SERVER_ID};
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tokio_stream::StreamExt;

const READY: Duration = Duration::from_secs(60);

/// Envoy's spelling of a certificate's serial (lowercase hex, no colons).
fn serial_of(pem: &str) -> String {
    leaf_facts(pem).1.replace(':', "").to_lowercase()
}

/// The default issuer of the PKI mount.
async fn default_issuer(env: &VaultEnv) -> String {
    let v = env
        .bao
        .root(Method::GET, &format!("{PKI_MOUNT}/config/issuers"), None)
        .await
        .unwrap();
    v["data"]["default"].as_str().unwrap().to_string()
}

/// Step 1 of the rotation: a new root issuer, not (yet) the default.
/// Returns its ID and PEM.
async fn new_root(env: &VaultEnv) -> (String, String) {
    let v = env
        .bao
        .root(
            Method::POST,
            &format!("{PKI_MOUNT}/root/rotate/internal"),
            Some(json!({ "common_name": "istio-ca.test", "ttl": "87600h" })),
        )
        .await
        .unwrap();
    let id = v["data"]["issuer_id"].as_str().unwrap().to_string();
    let pem = v["data"]["certificate"].as_str().unwrap().to_string();
    (id, pem)
}

async fn make_default(env: &VaultEnv, issuer: &str) {
    env.bao
        .root(
            Method::POST,
            &format!("{PKI_MOUNT}/config/issuers"),
            Some(json!({ "default": issuer })),
        )
        .await
        .unwrap();
}

/// Requests through the client Envoy every `every`, each on a new mTLS
/// connection between the Envoys, until dropped. Counts requests and keeps
/// every failure.
struct Traffic {
    requests: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(port: u16, every: Duration) -> Traffic {
        let requests = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (r, f) = (requests.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            loop {
                let started = tokio::time::Instant::now();
                let result = http.get(format!("http://127.0.0.1:{port}/")).send().await;
                r.fetch_add(1, Ordering::SeqCst);
                let failure = match result {
                    Ok(resp) if resp.status() == 200 => None,
                    Ok(resp) => Some(format!(
                        "status {}: {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    )),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(failure) = failure {
                    f.lock().unwrap().push(failure);
                }
                tokio::time::sleep_until(started + every).await;
            }
        });
        Traffic {
            requests,
            failures,
            task,
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client Envoy whose every request opens a new connection (and so a new
/// mTLS handshake, checked against its current `ROOTCA`) to the server.
async fn start_fresh_handshake_client(sds: SdsSource, port: u16, server_port: u16) -> EnvoyProc {
    let mut cfg = client_config(&sds, port, server_port, SERVER_ID);
    let clusters = cfg["static_resources"]["clusters"].as_array_mut().unwrap();
    let upstream = clusters
        .iter_mut()
        .find(|c| c["name"] == "server_mtls")
        .unwrap();
    upstream["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": { "max_requests_per_connection": 1 },
            "explicit_http_config": { "http_protocol_options": {} }
        }
    });
    EnvoyProc::start(&cfg).await.unwrap()
}

fn token_source(dir: &Path, name: &str, jwt: &str, socket: &Path) -> SdsSource {
    let token = dir.join(name);
    std::fs::write(&token, jwt).unwrap();
    SdsSource::GoogleGrpc {
        uds_path: socket.to_path_buf(),
        token_file: token,
    }
}

struct Seen {
    trusted: Vec<String>,
    leaf: String,
}

async fn seen(envoy: &EnvoyProc) -> Seen {
    let certs = envoy.certs().await;
    Seen {
        trusted: ca_serials(&certs),
        leaf: leaf_certs(&certs)
            .first()
            .map(|l| l.1.clone())
            .unwrap_or_default(),
    }
}

/// Polls until `done` holds for what the two Envoys show, or panics with
/// `what` and both agents' logs.
async fn until(
    what: &str,
    within: Duration,
    server: &EnvoyProc,
    client: &EnvoyProc,
    logs: impl Fn() -> String,
    mut done: impl FnMut(&Seen, &Seen) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let (s, c) = (seen(server).await, seen(client).await);
        if done(&s, &c) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; server trusts {:?} with leaf {}, client trusts {:?} with leaf {}\n{}",
            s.trusted,
            s.leaf,
            c.trusted,
            c.leaf,
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

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
    let (backend, server_port, client_port) = (free_port(), free_port(), free_port());
    let _backend = start_backend(backend, "ok").await;
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

/// Opens a `ROOTCA` stream and returns it with the roots (serials) of its
/// first response, ACKed.
async fn rootca_stream(
    socket: &Path,
    jwt: &str,
) -> (
    tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
    Vec<String>,
) {
    let mut client = connect(socket).await;
    let (tx, mut inbound) = open_stream(&mut client, jwt).await;
    tx.send(request(&["ROOTCA"], None)).await.unwrap();
    let first = inbound.next().await.unwrap().unwrap();
    tx.send(request(&["ROOTCA"], Some(&first))).await.unwrap();
    let roots = roots_of(&first);
    (tx, inbound, roots)
}

/// The serials of the roots a `ROOTCA` response carries.
fn roots_of(
    resp: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<String> {
    let pem = trusted_ca(&secrets(resp)[0]);
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|b| {
            let b = b.unwrap();
            b.parse_x509()
                .unwrap()
                .raw_serial_as_string()
                .replace(':', "")
                .to_lowercase()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_during_refreshes_keeps_the_bundle_and_pushes_nothing() {
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Up).await;
    let agent = Agent::started(&env.agent_env_with(&[("TRUST_REFRESH_INTERVAL", "1s")])).await;
    let old_root = serial_of(&env.setup.root_pem);
    let (_tx, mut inbound, roots) =
        rootca_stream(&agent.socket, &env.jwt("default", "httpbin")).await;
    assert_eq!(roots, std::slice::from_ref(&old_root));
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    // A second root, in no certificate's chain: served because the mount
    // lists it (this also shows that refreshes reach the stream).
    let (_, next_pem) = new_root(&env).await;
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(15),
        "the mount's new root was not pushed",
        || agent.log(),
    )
    .await
    .unwrap();
    let both = sorted(vec![old_root.clone(), serial_of(&next_pem)]);
    assert_eq!(sorted(roots_of(&pushed)), both);

    // Vault away for several refreshes: nothing is dropped, nothing pushed.
    env.proxy.as_ref().unwrap().set_up(false).await;
    agent
        .log_shows("cannot read the CA's roots", Duration::from_secs(10))
        .await;
    let quiet = tokio::time::timeout(Duration::from_secs(4), inbound.next()).await;
    assert!(quiet.is_err(), "pushed while Vault was away: {quiet:?}");
    assert!(
        agent
            .log()
            .contains("keeping the 2 root(s) of the trust bundle (ROOTCA)"),
        "{}",
        agent.log()
    );

    // Vault back with a third root: pushed with the other two.
    env.proxy.as_ref().unwrap().set_up(true).await;
    let (_, third_pem) = new_root(&env).await;
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(15),
        "no push after Vault came back with a new root",
        || agent.log(),
    )
    .await
    .unwrap();
    let mut all = both;
    all.push(serial_of(&third_pem));
    assert_eq!(sorted(roots_of(&pushed)), sorted(all));
}

/// A self-signed CA certificate, PEM.
fn extra_root(name: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn an_extra_roots_file_is_served_and_a_change_to_it_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("extra-roots.pem");
    let (x, y) = (extra_root("extra x"), extra_root("extra y"));
    std::fs::write(&file, &x).unwrap();
    let agent = Agent::started(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("TRUST_EXTRA_ROOTS", file.display().to_string()),
    ])
    .await;
    let (_tx, mut inbound, roots) =
        rootca_stream(&agent.socket, &fake_jwt("default", "httpbin")).await;
    assert_eq!(roots.len(), 2, "the local CA's root and the extra one");
    assert!(roots.contains(&serial_of(&x)), "{roots:?}");

    std::fs::write(&file, &y).unwrap();
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(15),
        "the changed file was not pushed",
        || agent.log(),
    )
    .await
    .unwrap();
    let roots = roots_of(&pushed);
    assert_eq!(roots.len(), 2, "{roots:?}");
    assert!(roots.contains(&serial_of(&y)), "{roots:?}");
    assert!(
        !roots.contains(&serial_of(&x)),
        "removed from the file: gone"
    );
    let log = agent.log();
    assert!(
        log.contains("trust bundle (ROOTCA): added root (in TRUST_EXTRA_ROOTS)")
            && log.contains("CN=extra y"),
        "{log}"
    );
    assert!(
        log.contains("removed root: it was removed from TRUST_EXTRA_ROOTS"),
        "{log}"
    );
}

#[tokio::test]
async fn an_unreadable_extra_roots_file_stops_the_agent_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(
        &dir.path().join("sock"),
        dir.path(),
        &[
            ("CA_PROVIDER", "LocalCA".into()),
            ("TRUST_EXTRA_ROOTS", "/nonexistent/roots.pem".into()),
        ],
    );
    let status = agent.exited(Duration::from_secs(20)).await;
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("TRUST_EXTRA_ROOTS /nonexistent/roots.pem: cannot read"),
        "{log}"
    );
}

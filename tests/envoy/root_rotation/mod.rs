//! `ROOTCA` is the mesh's trust, not one node's: two agents on one real
//! OpenBao, real Envoys doing mTLS across them, a root rotation run as
//! docs/trust.md tells an operator to ([`across_agents`]), and the trust
//! bundle's failure modes ([`bundle`]). This file holds the Vault issuer
//! steps, the traffic and what the Envoys are seen to hold.

use crate::support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use support::bao::PKI_MOUNT;
use support::envoy::*;
use support::mesh::SERVER_ID;
use support::sds_client::*;
use support::vault_env::VaultEnv;

mod across_agents;
mod bundle;

const READY: Duration = Duration::from_secs(60);

/// Envoy's spelling of a certificate's serial (lowercase hex, no colons).
pub(crate) fn serial_of(pem: &str) -> String {
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
pub(crate) async fn new_root(env: &VaultEnv) -> (String, String) {
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

pub(crate) async fn make_default(env: &VaultEnv, issuer: &str) {
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
pub(crate) struct Traffic {
    requests: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    pub(crate) fn start(port: u16, every: Duration) -> Traffic {
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

    pub(crate) fn failures(&self) -> Vec<String> {
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
pub(crate) async fn start_fresh_handshake_client(
    sds: SdsSource,
    port: u16,
    server_port: u16,
) -> EnvoyProc {
    EnvoyProc::start(&fresh_handshake_client_config(&sds, port, server_port))
        .await
        .unwrap()
}

/// The bootstrap of [`start_fresh_handshake_client`].
pub(crate) fn fresh_handshake_client_config(
    sds: &SdsSource,
    port: u16,
    server_port: u16,
) -> serde_json::Value {
    let mut cfg = client_config(sds, port, server_port, SERVER_ID);
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
    cfg
}

pub(crate) fn token_source(dir: &Path, name: &str, jwt: &str, socket: &Path) -> SdsSource {
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

//! The storm (M workloads asking node-agent for their first certificate at
//! once) and its floor (the same M login+sign pairs sent straight to OpenBao
//! by the same HTTP client, with CSRs made beforehand).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use node_agent::client::sds::{served_identity, SdsClient, SecretStream};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sds;
use crate::vault::{spiffe_id, AUTH_PATH, SIGN_PATH};

/// Wall time of a burst and the spread of its members' completion times.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timing {
    pub count: usize,
    pub wall_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The agent's CPU (user + system) during the storm, per certificate it
    /// issued: key, CSR, login and sign calls, the checks of each answer,
    /// and the push; 0 where not measured (the floor has no agent).
    #[serde(default)]
    pub agent_cpu_ms_per_certificate: f64,
}

impl Timing {
    pub fn from(mut done: Vec<Duration>, wall: Duration) -> Self {
        done.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Self {
            count: done.len(),
            wall_s: wall.as_secs_f64(),
            p50_ms: ms(percentile(&done, 0.50)),
            p99_ms: ms(percentile(&done, 0.99)),
            max_ms: ms(done.last().copied().unwrap_or_default()),
            agent_cpu_ms_per_certificate: 0.0,
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The HTTP client node-agent's Vault client builds (src/ca/vault.rs,
/// `VaultCa::new`), with the same settings and the agent's defaults.
pub fn vault_http_client(ca_pem: &Path) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(ca_pem)?;
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .user_agent(concat!("node-agent/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .build()?)
}

async fn post(
    http: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: Value,
) -> anyhow::Result<Value> {
    let mut req = http
        .post(&url)
        .header("X-Vault-Request", "true")
        .json(&body);
    if let Some(t) = token {
        req = req.header("X-Vault-Token", t);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("POST {url}: {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// M login+sign pairs, `concurrency` at a time, straight to Vault.
pub async fn floor(
    addr: &str,
    ca_pem: &Path,
    jwts: &[String],
    csrs: &[String],
    concurrency: usize,
) -> anyhow::Result<Timing> {
    let http = vault_http_client(ca_pem)?;
    let work: Arc<Vec<(String, String)>> =
        Arc::new(jwts.iter().cloned().zip(csrs.iter().cloned()).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, work, next, addr) = (http.clone(), work.clone(), next.clone(), addr.to_string());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((jwt, csr)) = work.get(i) else {
                    return Ok::<_, anyhow::Error>(done);
                };
                let login = post(
                    &http,
                    format!("{addr}/v1/{AUTH_PATH}"),
                    None,
                    json!({ "role": "istio-cert", "jwt": jwt }),
                )
                .await?;
                let token = login["auth"]["client_token"]
                    .as_str()
                    .ok_or_else(|| anyhow!("login answer without a token"))?;
                let signed = post(
                    &http,
                    format!("{addr}/v1/{SIGN_PATH}"),
                    Some(token),
                    json!({ "csr": csr, "format": "pem", "ttl": "3600s", "exclude_cn_from_sans": true }),
                )
                .await?;
                if signed["data"]["certificate"].as_str().is_none() {
                    bail!("sign answer without a certificate");
                }
                done.push(start.elapsed());
            }
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.extend(t.await??);
    }
    Ok(Timing::from(done, start.elapsed()))
}

/// One simulated Envoy: its connection and its open streams.
pub struct Workload {
    pub name: String,
    pub jwt: String,
    pub client: SdsClient,
    pub streams: Vec<SecretStream>,
}

/// Connects one workload per (name, JWT), 64 connects at a time.
pub async fn connect_all(
    socket: &Path,
    names: &[String],
    jwts: &[String],
) -> anyhow::Result<Vec<Workload>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for (name, jwt) in names.iter().zip(jwts) {
        let (sem, socket, name, jwt) =
            (sem.clone(), socket.to_path_buf(), name.clone(), jwt.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            let client = sds::connect(&socket).await?;
            Ok::<_, anyhow::Error>(Workload {
                name,
                jwt,
                client,
                streams: Vec::new(),
            })
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Every workload opens a stream for `resource` at the same instant; returns
/// when all have their first response (checked: a `default` response must be
/// the workload's own certificate and key), with the streams kept open.
pub async fn open_all(
    workloads: Vec<Workload>,
    resource: &'static str,
) -> anyhow::Result<(Vec<Workload>, Timing)> {
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for mut w in workloads {
        let mut go = go_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = go.wait_for(|v| *v).await;
            let node = format!("sidecar~10.0.0.1~{}.bench~bench.svc.cluster.local", w.name);
            let result = async {
                let mut s = sds::open(&mut w.client, &w.jwt, resource, &node).await?;
                let resp = s.next().await?;
                let at = Instant::now();
                s.try_ack(&resp);
                Ok::<_, anyhow::Error>((s, resp, at))
            }
            .await;
            (w, result)
        }));
    }
    let start = Instant::now();
    go_tx.send_replace(true);
    let mut done = Vec::new();
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for t in tasks {
        let (mut w, result) = t.await?;
        match result {
            Ok((s, resp, at)) => {
                done.push(at - start);
                if resource == "default" {
                    let got = served_identity(&resp)
                        .with_context(|| format!("the response to {}", w.name))?;
                    if got != spiffe_id(&w.name) {
                        bail!("{} was served {got}", w.name);
                    }
                } else if resp.resources.is_empty() {
                    bail!("{} got an empty {resource} response", w.name);
                }
                w.streams.push(s);
            }
            Err(e) => failures.push(format!("{}: {e:#}", w.name)),
        }
        out.push(w);
    }
    let wall = done.iter().max().copied().unwrap_or_default();
    if !failures.is_empty() {
        bail!(
            "{} of {} streams for {resource} failed, e.g. {}",
            failures.len(),
            out.len(),
            failures[0]
        );
    }
    Ok((out, Timing::from(done, wall)))
}

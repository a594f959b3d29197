//! Memory per open stream for each protocol the agent serves streams on:
//! SDS `StreamSecrets` and `DeltaSecrets`, and the Workload API's
//! `FetchX509SVID`, measured the same way for all three.
//!
//! Each protocol gets a fresh agent (`CA_PROVIDER=LocalCA`, so no Vault, and
//! one-workload mode, as the Workload API serves only then), so that memory
//! the allocator kept from one protocol does not flatter the next. On it:
//!
//! 1. one stream of the protocol on a connection of its own gets its first
//!    response: the identity is cached and the serving path warmed. It stays
//!    open to the end. RSS settles: `warm`.
//! 2. C connections are opened, no stream on them yet. RSS settles:
//!    `connected`.
//! 3. N streams (N / C per connection, one identity, the `default`
//!    certificate) are opened; each gets its first response, and SDS's are
//!    ACKed as Envoy does. RSS settles: `loaded`.
//!
//! Per stream is `(loaded − connected) / N`: what an open stream holds, the
//! buffers its connection grew for it included, as the fitted figure of the
//! storm's memory points counts a stream; per connection is
//! `(connected − warm) / C`; and with its share of a connection,
//! `(loaded − warm) / N`.
//!
//! SDS requests are Envoy's: the `node` it sends (captured from a real
//! Envoy) in `StreamSecrets`' first request and each ACK, and in
//! `DeltaSecrets`' first request only; the workload's JWT in
//! `istio_sds_credentials_header-bin`. A `FetchX509SVID` request is empty
//! and carries `workload.spiffe.io: true`; its credential is the token file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use futures::future::try_join_all;
use hyper_util::rt::TokioIo;
use node_agent::workload_api::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use node_agent::workload_api::pb::{X509svidRequest, X509svidResponse};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use crate::procs::{self, AgentProc};
use crate::{EXTRA_ENV, LOG_LEVEL};

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SDS_CREDENTIAL_HEADER: &str = "istio_sds_credentials_header-bin";
const WORKLOAD_API_HEADER: &str = "workload.spiffe.io";
const NAMESPACE: &str = "bench";
const SERVICE_ACCOUNT: &str = "streams";
const NODE_ID: &str = "sidecar~10.0.0.1~streams.bench~bench.svc.cluster.local";

/// The goal for each protocol's memory per open stream, KiB.
pub const GOAL_KIB: f64 = 8.0;

/// The protocols measured, in the order they run.
pub const PROTOCOLS: [Protocol; 3] = [
    Protocol::StreamSecrets,
    Protocol::DeltaSecrets,
    Protocol::FetchX509Svid,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    StreamSecrets,
    DeltaSecrets,
    FetchX509Svid,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::StreamSecrets => "StreamSecrets",
            Self::DeltaSecrets => "DeltaSecrets",
            Self::FetchX509Svid => "FetchX509SVID",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::StreamSecrets => "streams-sotw",
            Self::DeltaSecrets => "streams-delta",
            Self::FetchX509Svid => "streams-svid",
        }
    }
}

/// One protocol's figures; RSS in KiB, settled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamMemory {
    pub protocol: String,
    pub streams: usize,
    pub connections: usize,
    /// The warm agent: identity cached, one stream open.
    pub warm_rss_kib: u64,
    /// With the C connections open, no stream on them.
    pub connected_rss_kib: u64,
    /// With the N streams open, each served.
    pub loaded_rss_kib: u64,
    pub peak_rss_kib: u64,
    pub per_stream_kib: f64,
    pub per_connection_kib: f64,
    pub per_stream_with_connection_kib: f64,
    /// From the first stream opened to the last first response.
    pub open_s: f64,
    /// Per stream in every round, ascending; the figures above are the
    /// median round's.
    pub runs_per_stream_kib: Vec<f64>,
}

/// The three protocols' figures and how they were taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamsMemory {
    pub method: String,
    pub protocols: Vec<StreamMemory>,
}

/// N streams over C connections.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub streams: usize,
    pub per_connection: usize,
    /// Rounds of the three measurements (a few seconds each); the median
    /// round is kept.
    pub rounds: usize,
}

impl Sizes {
    pub fn connections(&self) -> usize {
        self.streams.div_ceil(self.per_connection.max(1))
    }
}

/// Every protocol in turn, each on a fresh agent.
pub async fn measure_all(
    bin: &Path,
    work: &Path,
    sizes: Sizes,
    node: &Node,
) -> anyhow::Result<StreamsMemory> {
    let dir = work.join("streams");
    std::fs::create_dir_all(&dir)?;
    let token = dir.join("token");
    std::fs::write(&token, fake_jwt(NAMESPACE, SERVICE_ACCOUNT))?;
    // Rounds of all three in turn, so that each protocol meets the same
    // machine; the round with the median per-stream figure is kept.
    let mut runs: Vec<Vec<StreamMemory>> = vec![Vec::new(); PROTOCOLS.len()];
    for _ in 0..sizes.rounds.max(1) {
        for (i, p) in PROTOCOLS.into_iter().enumerate() {
            let m = measure(p, bin, &dir, &token, sizes, node)
                .await
                .with_context(|| format!("memory per {} stream", p.name()))?;
            eprintln!(
                "bench: streams {:<13} {} over {} connections: {:.1} KiB per stream, {:.1} KiB per connection",
                m.protocol, m.streams, m.connections, m.per_stream_kib, m.per_connection_kib
            );
            runs[i].push(m);
        }
    }
    let protocols = runs
        .into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a.per_stream_kib.total_cmp(&b.per_stream_kib));
            let all: Vec<f64> = r.iter().map(|m| m.per_stream_kib).collect();
            let mut m = r.swap_remove(r.len() / 2);
            m.runs_per_stream_kib = all;
            m
        })
        .collect();
    Ok(StreamsMemory {
        method: format!(
            "a fresh agent per protocol (LocalCA, one-workload mode), one identity, one warm stream open; \
             then {} connections, then {} streams on them ({} per connection), each served once (SDS's ACKed); \
             per stream = (RSS with the streams − RSS with the connections) / streams, RSS settled; \
             the median of {} round(s)",
            sizes.connections(),
            sizes.streams,
            sizes.per_connection,
            sizes.rounds.max(1)
        ),
        protocols,
    })
}

fn agent_env(dir: &Path, p: Protocol, token: &Path, sizes: Sizes) -> Vec<(String, String)> {
    // Room for the measured connections and streams, the warm one, and
    // the harness's readiness probes.
    let conns = (sizes.connections() + 64).to_string();
    let streams = (sizes.streams + 64).to_string();
    let mut env: Vec<(String, String)> = [
        ("CA_PROVIDER", "LocalCA".to_string()),
        ("LOG_LEVEL", LOG_LEVEL.to_string()),
        ("WORKLOAD_TOKEN_PATH", token.display().to_string()),
        (
            "WORKLOAD_API_SOCKET",
            api_socket(dir, p).display().to_string(),
        ),
        ("SDS_MAX_CONNECTIONS", conns.clone()),
        ("SDS_MAX_STREAMS", streams.clone()),
        (
            "SDS_CONNECTION_MAX_STREAMS",
            sizes.per_connection.max(16).to_string(),
        ),
        ("WORKLOAD_API_MAX_CONNECTIONS", conns),
        ("WORKLOAD_API_MAX_STREAMS", streams),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(EXTRA_ENV.get().into_iter().flatten().cloned());
    env
}

fn api_socket(dir: &Path, p: Protocol) -> PathBuf {
    dir.join(format!("{}-api.sock", p.tag()))
}

async fn measure(
    p: Protocol,
    bin: &Path,
    dir: &Path,
    token: &Path,
    sizes: Sizes,
    node: &Node,
) -> anyhow::Result<StreamMemory> {
    let mut agent = AgentProc::start(bin, dir, p.tag(), &agent_env(dir, p, token, sizes)).await?;
    let socket = match p {
        Protocol::FetchX509Svid => api_socket(dir, p),
        _ => agent.socket.clone(),
    };
    let jwt = fake_jwt(NAMESPACE, SERVICE_ACCOUNT);
    let settle = |pid| procs::settled(pid, Duration::from_secs(1), Duration::from_secs(10));

    let warm_channel = connect(&socket).await?;
    let warm = open(p, warm_channel.clone(), &jwt, node)
        .await
        .with_context(|| format!("the warm stream; agent log:\n{}", agent.log_tail()))?;
    let warm_rss = settle(agent.pid()).await;

    let channels = try_join_all((0..sizes.connections()).map(|_| connect(&socket))).await?;
    let connected = settle(agent.pid()).await;

    let started = Instant::now();
    let per = sizes.per_connection.max(1);
    let held = try_join_all(channels.iter().enumerate().map(|(i, ch)| {
        let jwt = &jwt;
        let count = per.min(sizes.streams - i * per);
        async move {
            // One stream at a time per connection, all connections at once:
            // as many first requests in flight as connections.
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                held.push(open(p, ch.clone(), jwt, node).await?);
            }
            anyhow::Ok(held)
        }
    }))
    .await
    .with_context(|| {
        format!(
            "opening {} streams; agent log:\n{}",
            sizes.streams,
            agent.log_tail()
        )
    })?;
    let open_s = started.elapsed().as_secs_f64();
    let opened: usize = held.iter().map(Vec::len).sum();
    if opened != sizes.streams {
        bail!("opened {opened} streams, not {}", sizes.streams);
    }
    let loaded = settle(agent.pid()).await;

    agent.check_alive()?;
    // LocalCA warns at start that it is for development only.
    let errors: Vec<String> = agent
        .error_lines()
        .into_iter()
        .filter(|l| !l.contains("CA_PROVIDER=LocalCA"))
        .collect();
    if !errors.is_empty() {
        bail!(
            "the agent logged {} errors or warnings, e.g. {}",
            errors.len(),
            errors[0]
        );
    }
    drop(held);
    drop(warm);
    drop(channels);
    agent.stop();

    let n = sizes.streams as f64;
    let c = sizes.connections() as f64;
    let diff = |a: u64, b: u64| a as f64 - b as f64;
    Ok(StreamMemory {
        protocol: p.name().into(),
        streams: sizes.streams,
        connections: sizes.connections(),
        warm_rss_kib: warm_rss.rss_kib,
        connected_rss_kib: connected.rss_kib,
        loaded_rss_kib: loaded.rss_kib,
        peak_rss_kib: loaded.hwm_kib,
        per_stream_kib: diff(loaded.rss_kib, connected.rss_kib) / n,
        per_connection_kib: diff(connected.rss_kib, warm_rss.rss_kib) / c,
        per_stream_with_connection_kib: diff(loaded.rss_kib, warm_rss.rss_kib) / n,
        open_s,
        runs_per_stream_kib: Vec::new(),
    })
}

/// One HTTP/2 connection over the Unix socket, made now (not lazily). A
/// socket not yet bound or a full listen backlog is retried for up to 30 s.
async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let path = socket.to_path_buf();
        let attempt = Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await;
        match attempt {
            Ok(ch) => return Ok(ch),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("connect to {}", socket.display())),
        }
    }
}

/// An open stream, kept open (request side included) until dropped.
#[allow(dead_code)] // held only to keep the streams open
enum Held {
    Sotw(mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>),
    Delta(
        mpsc::Sender<DeltaDiscoveryRequest>,
        Streaming<DeltaDiscoveryResponse>,
    ),
    Svid(Streaming<X509svidResponse>),
}

/// Opens a stream of `p` for `default` on `ch`, waits for its first
/// response, checks it, and ACKs it when the protocol has ACKs.
async fn open(p: Protocol, ch: Channel, jwt: &str, node: &Node) -> anyhow::Result<Held> {
    match p {
        Protocol::StreamSecrets => {
            let (tx, rx) = mpsc::channel(4);
            tx.send(DiscoveryRequest {
                node: Some(envoy_node(node)),
                resource_names: vec!["default".into()],
                type_url: SECRET_TYPE.into(),
                ..Default::default()
            })
            .await?;
            let mut inbound = SecretDiscoveryServiceClient::new(ch)
                .stream_secrets(with_jwt(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    jwt,
                ))
                .await
                .context("open StreamSecrets")?
                .into_inner();
            let resp = first(&mut inbound).await?;
            check_secret(resp.resources.first().map(|a| (&a.type_url, &a.value)))?;
            tx.send(DiscoveryRequest {
                node: Some(envoy_node(node)),
                resource_names: vec!["default".into()],
                type_url: SECRET_TYPE.into(),
                version_info: resp.version_info.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await?;
            Ok(Held::Sotw(tx, inbound))
        }
        Protocol::DeltaSecrets => {
            let (tx, rx) = mpsc::channel(4);
            tx.send(DeltaDiscoveryRequest {
                node: Some(envoy_node(node)),
                resource_names_subscribe: vec!["default".into()],
                type_url: SECRET_TYPE.into(),
                ..Default::default()
            })
            .await?;
            let mut inbound = SecretDiscoveryServiceClient::new(ch)
                .delta_secrets(with_jwt(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    jwt,
                ))
                .await
                .context("open DeltaSecrets")?
                .into_inner();
            let resp = first(&mut inbound).await?;
            check_secret(
                resp.resources
                    .first()
                    .and_then(|r| r.resource.as_ref())
                    .map(|a| (&a.type_url, &a.value)),
            )?;
            tx.send(DeltaDiscoveryRequest {
                type_url: SECRET_TYPE.into(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await?;
            Ok(Held::Delta(tx, inbound))
        }
        Protocol::FetchX509Svid => {
            let mut req = tonic::Request::new(X509svidRequest {});
            req.metadata_mut()
                .insert(WORKLOAD_API_HEADER, "true".parse().expect("ASCII"));
            let mut inbound = SpiffeWorkloadApiClient::new(ch)
                .fetch_x509svid(req)
                .await
                .context("open FetchX509SVID")?
                .into_inner();
            let resp = first(&mut inbound).await?;
            let want = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}");
            match resp.svids.first() {
                Some(s) if s.spiffe_id == want && !s.x509_svid.is_empty() => {}
                Some(s) => bail!("an SVID for {:?}, not {want}", s.spiffe_id),
                None => bail!("no SVID"),
            }
            Ok(Held::Svid(inbound))
        }
    }
}

async fn first<T>(inbound: &mut Streaming<T>) -> anyhow::Result<T> {
    match inbound.message().await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => bail!("the stream ended without a response"),
        Err(s) => bail!("the stream ended with {:?}: {}", s.code(), s.message()),
    }
}

/// The response's resource is the `default` secret: a certificate chain
/// and its key.
fn check_secret(any: Option<(&String, &Vec<u8>)>) -> anyhow::Result<()> {
    let (type_url, value) = any.ok_or_else(|| anyhow!("no resource"))?;
    if type_url != SECRET_TYPE {
        bail!("resource of type {type_url}");
    }
    let s = Secret::decode(value.as_slice())?;
    match s.r#type {
        Some(secret::Type::TlsCertificate(t))
            if s.name == "default" && t.certificate_chain.is_some() && t.private_key.is_some() =>
        {
            Ok(())
        }
        _ => bail!("{:?} is not the default certificate with its key", s.name),
    }
}

fn envoy_node(node: &Node) -> Node {
    let mut node = node.clone();
    node.id = NODE_ID.into();
    node.cluster = "bench".into();
    node
}

fn with_jwt<T>(msg: T, jwt: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert_bin(
        SDS_CREDENTIAL_HEADER,
        tonic::metadata::MetadataValue::from_bytes(jwt.as_bytes()),
    );
    req
}

/// An unsigned service-account JWT: LocalCA takes the identity from its
/// claims without verifying it (it has no TokenReview to ask).
fn fake_jwt(ns: &str, sa: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"iss":"kubernetes/serviceaccount","sub":"system:serviceaccount:{ns}:{sa}","kubernetes.io/serviceaccount/namespace":"{ns}"}}"#
    ));
    format!("{h}.{p}.c2lnbmF0dXJl")
}

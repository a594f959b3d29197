//! The status server (`STATUS_ADDR`, default `0.0.0.0:15020`): plain
//! HTTP/1.1 for kubelet probes and Prometheus.
//!
//! | path | answer |
//! |---|---|
//! | `/healthz/live` | 200 while the agent runs |
//! | `/healthz/ready` | 200 once the SDS socket serves, else 503 with the reason |
//! | `/metrics` | Prometheus text (or OpenMetrics when asked for) |
//! | `/debug/identities` | JSON: every cached identity, without keys or tokens |
//!
//! Anyone who can reach the port can ask, so it is bounded ([`StatusLimits`]).
//! A connection holds no place until its first request head is complete
//! (`STATUS_HEADER_TIMEOUT`, `STATUS_MAX_HEADER_BYTES`); at most
//! `STATUS_MAX_PENDING_CONNECTIONS` wait for theirs, and the address with
//! the most of them loses its oldest first ([`pending`]). Health probes then
//! have places of their own (`STATUS_PROBE_CONNECTIONS`) beside the
//! `STATUS_MAX_CONNECTIONS` of everything else ([`admission`]). A
//! connection lives `STATUS_CONNECTION_LIFETIME` at most. Only `GET` and
//! `HEAD` are answered and request bodies are never read.
//!
//! What names a workload, `/debug/identities` and the metric series
//! labelled with an identity, is shown only to clients `STATUS_DEBUG_FROM`
//! allows (loopback by default): the port is reachable from the cluster
//! network and those list every workload of the node. Others get 403 for
//! the page and the node-wide metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

pub use crate::config::observe::StatusLimits;
pub use crate::config::DebugFrom;
use crate::endpoint::warn::Warnings;
use crate::metrics::{self, AgentReport, Format};
use admission::{Head, HeadError, Kind, Rewound};
use pending::{Pending, PendingSet};

mod admission;
mod debug;
pub mod health;
mod pending;

/// Why the status server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on STATUS_ADDR {addr}: {source}; choose another address, or set STATUS_ADDR to empty to turn the status server off")]
pub struct StatusError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// What the endpoints answer from.
pub struct StatusState {
    /// The SDS socket readiness is probed on.
    pub sds_socket: PathBuf,
    /// The agent's state, for `/debug/identities` (the metrics read it through
    /// [`metrics::global`]).
    pub report: Arc<dyn AgentReport>,
    /// The server's bounds.
    pub limits: StatusLimits,
    /// Who is shown what names a workload.
    pub debug_from: DebugFrom,
}

/// A running status server.
pub struct StatusServer {
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl StatusServer {
    /// Stops accepting (open connections end on their own bounds).
    pub fn stop(self) {
        self.task.abort();
    }
}

/// What every connection shares: the state, the places and the throttled
/// warnings of the bounds.
struct Server {
    state: StatusState,
    pending: Arc<PendingSet>,
    probes: Arc<Semaphore>,
    others: Arc<Semaphore>,
    warnings: Warnings,
}

/// Binds `addr` and serves until `shutdown` turns true.
pub async fn start(
    addr: SocketAddr,
    state: StatusState,
    mut shutdown: watch::Receiver<bool>,
) -> Result<StatusServer, StatusError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StatusError { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| StatusError { addr, source })?;
    let limits = state.limits;
    let debug_from = state.debug_from.to_string();
    let server = Arc::new(Server {
        pending: PendingSet::new(limits.max_pending),
        probes: Arc::new(Semaphore::new(limits.probe_connections)),
        others: Arc::new(Semaphore::new(limits.max_connections)),
        warnings: Warnings::default(),
        state,
    });
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, usually: wait instead of spinning.
                        tracing::warn!("status server: cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stopping(&mut shutdown) => return,
            };
            // What came with the connection: kubelet's whole request, usually.
            let mut first = Vec::with_capacity(FIRST_READ.min(limits.max_header_bytes));
            let _ = stream.try_read_buf(&mut first);
            let first = match admission::complete(first) {
                Ok(head) => {
                    tokio::spawn(serve(server.clone(), stream, peer, head));
                    continue;
                }
                Err(first) => first,
            };
            let (pending, displaced) = server.pending.admit(peer.ip());
            if let Some(from) = displaced {
                server.warnings.warn(
                    "STATUS_MAX_PENDING_CONNECTIONS",
                    format!(
                        "status server: STATUS_MAX_PENDING_CONNECTIONS={} connections are still sending their first request: closing the oldest from {from}, the address with the most of them, to admit a new one",
                        limits.max_pending
                    ),
                );
            }
            tokio::spawn(pending_connection(
                server.clone(),
                stream,
                peer,
                pending,
                first,
            ));
        }
    });
    tracing::info!(addr = %local_addr, debug_from = %debug_from, "status server listening (/healthz/live, /healthz/ready, /metrics, /debug/identities; identities shown to STATUS_DEBUG_FROM)");
    Ok(StatusServer { local_addr, task })
}

/// Bytes read from a new connection before it is admitted as pending.
const FIRST_READ: usize = 4096;

/// A connection whose first request head is not complete yet: it is read
/// while the connection is pending, then the connection is served.
async fn pending_connection(
    server: Arc<Server>,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut pending: Pending,
    first: Vec<u8>,
) {
    let limits = server.state.limits;
    let head = tokio::select! {
        _ = pending.displaced() => return,
        r = tokio::time::timeout(
            limits.header_timeout,
            admission::read_head(&mut stream, limits.max_header_bytes, first),
        ) => r,
    };
    drop(pending);
    match head {
        Ok(Ok(head)) => serve(server, stream, peer, head).await,
        Ok(Err(e @ HeadError::TooLarge(_))) => {
            let message = format!("status server: refusing {peer}: {e}");
            refuse(&stream, "431 Request Header Fields Too Large", &message);
            server.warnings.warn("STATUS_MAX_HEADER_BYTES", message);
        }
        Ok(Err(e)) => tracing::debug!("status server: {peer}: {e}"),
        Err(_) => {
            let message = format!(
                "status server: closing {peer}: no complete request head within STATUS_HEADER_TIMEOUT={:?}",
                limits.header_timeout
            );
            refuse(&stream, "408 Request Timeout", &message);
            server.warnings.warn("STATUS_HEADER_TIMEOUT", message);
        }
    }
}

/// A connection with its first request head: the head chooses its place
/// (see [`admission`]), then HTTP/1.1 serves it in that place.
async fn serve(server: Arc<Server>, stream: TcpStream, peer: SocketAddr, head: Head) {
    let limits = server.state.limits;
    let (places, bound) = match head.kind {
        Kind::Probe => (&server.probes, "STATUS_PROBE_CONNECTIONS"),
        Kind::Other => (&server.others, "STATUS_MAX_CONNECTIONS"),
    };
    let Ok(place) = places.clone().try_acquire_owned() else {
        let message = match head.kind {
            Kind::Probe => format!(
                "status server: STATUS_PROBE_CONNECTIONS={} health probes are being answered: answering one more from {peer} with 503",
                limits.probe_connections
            ),
            Kind::Other => format!(
                "status server: STATUS_MAX_CONNECTIONS={} connections are open: answering a new one from {peer} with 503 and closing it; health probes have places of their own",
                limits.max_connections
            ),
        };
        refuse(&stream, "503 Service Unavailable", &message);
        server.warnings.warn(bound, message);
        return;
    };
    let shows_workloads = server.state.debug_from.allows(peer.ip());
    let service = {
        let server = server.clone();
        hyper::service::service_fn(move |req| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(route(&server.state, req, shows_workloads).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        // A probe's place is for its one request, as kubelet closes it anyway.
        .keep_alive(head.kind == Kind::Other)
        .serve_connection(TokioIo::new(Rewound::new(head.bytes, stream)), service);
    let _ = tokio::time::timeout(limits.connection_lifetime, conn).await;
    drop(place);
}

/// Answers a connection that gets no place with `status` and `message`,
/// then it is closed. Best effort: a client that does not read is not waited for.
fn refuse(stream: &TcpStream, status: &str, message: &str) {
    let body = format!("{message}\n");
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {TEXT}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// Answers one request; `shows_workloads` says whether the client may see
/// what names a workload (`STATUS_DEBUG_FROM`).
async fn route(state: &StatusState, req: Request<Incoming>, shows_workloads: bool) -> Answer {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD are served\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/healthz/live" => answer(StatusCode::OK, TEXT, "live\n"),
        "/healthz/ready" => match health::probe_sds(&state.sds_socket).await {
            Ok(()) => answer(
                StatusCode::OK,
                TEXT,
                format!("ready: SDS is serving on {}\n", state.sds_socket.display()),
            ),
            Err(reason) => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {reason}\n"),
            ),
        },
        "/metrics" => {
            let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let format = Format::from_accept(accept);
            let text = if shows_workloads {
                metrics::global().encode(format)
            } else {
                metrics::global().encode_node_wide(format)
            };
            answer(StatusCode::OK, format.content_type(), text)
        }
        "/debug/identities" if shows_workloads => answer(
            StatusCode::OK,
            JSON,
            debug::identities_json(state.report.as_ref()),
        ),
        "/debug/identities" => answer(
            StatusCode::FORBIDDEN,
            TEXT,
            format!(
                "/debug/identities lists the node's workloads and is shown only to STATUS_DEBUG_FROM={}; ask from there (e.g. kubectl port-forward, which arrives on loopback) or widen STATUS_DEBUG_FROM\n",
                state.debug_from
            ),
        ),
        _ => answer(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; served: /healthz/live, /healthz/ready, /metrics, /debug/identities\n",
        ),
    }
}

/// Starts the status server of an agent (unless `STATUS_ADDR` is empty) and
/// has the metrics read `manager`'s state.
pub async fn serve_agent(
    config: &crate::config::Config,
    manager: &Arc<crate::secrets::SecretManager>,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<StatusServer>, StatusError> {
    let report: Arc<dyn AgentReport> = manager.clone();
    metrics::global().set_report(Arc::downgrade(&report));
    let Some(addr) = config.observe.status_addr else {
        tracing::info!("status server off (STATUS_ADDR is empty)");
        return Ok(None);
    };
    let state = StatusState {
        sds_socket: config.workload_uds_path.clone(),
        report,
        limits: config.observe.status_limits,
        debug_from: config.observe.status_debug_from.clone(),
    };
    start(addr, state, shutdown).await.map(Some)
}

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
//! Anyone who can reach the port can ask, so it is bounded ([`StatusLimits`]):
//! at most `STATUS_MAX_CONNECTIONS` connections at once (more are closed at
//! once), each given `STATUS_HEADER_TIMEOUT` to send its request head and
//! `STATUS_CONNECTION_LIFETIME` in all; only `GET` and `HEAD` are answered
//! and request bodies are never read.

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
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use crate::config::observe::StatusLimits;
use crate::metrics::{self, AgentReport, Format};

mod debug;
pub mod health;

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
    let state = Arc::new(state);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let task = tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, usually: wait instead of spinning.
                        tracing::warn!("status server: cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stopping(&mut shutdown) => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(
                    "status server: STATUS_MAX_CONNECTIONS={} connections open; closing a new one",
                    limits.max_connections
                );
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(limits.connection_lifetime, conn).await;
                drop(slot);
            });
        }
    });
    tracing::info!(addr = %local_addr, "status server listening (/healthz/live, /healthz/ready, /metrics, /debug/identities)");
    Ok(StatusServer { local_addr, task })
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

async fn route(state: &StatusState, req: Request<Incoming>) -> Answer {
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
            answer(
                StatusCode::OK,
                format.content_type(),
                metrics::global().encode(format),
            )
        }
        "/debug/identities" => answer(
            StatusCode::OK,
            JSON,
            debug::identities_json(state.report.as_ref()),
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
    };
    start(addr, state, shutdown).await.map(Some)
}

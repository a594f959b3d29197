//! The SDS server (`envoy.service.secret.v3.SecretDiscoveryService`) on a
//! Unix socket: one task per `StreamSecrets` stream, `FetchSecrets` answered
//! from the same cache.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::identity::Credential;
use crate::secrets::{SecretError, SecretManager};

pub mod resources;
mod stream;
pub mod uds;

/// gRPC metadata carrying the workload's JWT (Istio 1.2+ spelling).
pub const CREDENTIAL_HEADER: &str = "istio_sds_credentials_header-bin";
/// Istio 1.1's misspelt header, still accepted.
pub const CREDENTIAL_HEADER_1_1: &str = "istio_sds_credentail_header-bin";

/// Where a connection's credential comes from.
#[derive(Clone, Debug)]
pub(crate) enum CredentialSource {
    /// Sent by Envoy in the stream's metadata.
    Header(Credential),
    /// Read from `WORKLOAD_TOKEN_PATH`, fresh on each use (kubelet rotates it).
    TokenFile(PathBuf),
    /// Nothing: the request is refused.
    Missing,
}

impl CredentialSource {
    fn from_metadata(md: &MetadataMap, token_path: Option<&Path>) -> Self {
        for key in [CREDENTIAL_HEADER, CREDENTIAL_HEADER_1_1] {
            if let Some(v) = md.get_bin(key) {
                if let Ok(bytes) = v.to_bytes() {
                    if let Ok(s) = std::str::from_utf8(&bytes) {
                        if !s.trim().is_empty() {
                            return Self::Header(Credential::new(s));
                        }
                    }
                }
            }
        }
        if let Some(v) = md.get("authorization").and_then(|v| v.to_str().ok()) {
            let v = v.trim();
            if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
                return Self::Header(Credential::new(&v[7..]));
            }
        }
        match token_path {
            Some(p) => Self::TokenFile(p.to_path_buf()),
            None => Self::Missing,
        }
    }

    /// The credential, or `Unauthenticated` saying what is missing.
    pub(crate) fn get(&self) -> Result<Credential, Status> {
        let cred = match self {
            Self::Header(c) => c.clone(),
            Self::TokenFile(p) => match std::fs::read_to_string(p) {
                Ok(s) if !s.trim().is_empty() => Credential::new(s),
                Ok(_) => {
                    return Err(Status::unauthenticated(format!(
                        "no credential: the request carries none and WORKLOAD_TOKEN_PATH {} is empty",
                        p.display()
                    )))
                }
                Err(e) => {
                    return Err(Status::unauthenticated(format!(
                        "no credential: the request carries none and WORKLOAD_TOKEN_PATH {} cannot be read: {e}",
                        p.display()
                    )))
                }
            },
            Self::Missing => {
                return Err(Status::unauthenticated(format!(
                    "no credential: send the workload's JWT in gRPC metadata {CREDENTIAL_HEADER} \
                     (or authorization: Bearer), or set WORKLOAD_TOKEN_PATH"
                )))
            }
        };
        if let Err(e) = cred.claims() {
            return Err(Status::unauthenticated(format!("invalid credential: {e}")));
        }
        Ok(cred)
    }
}

/// Logs why a request was refused: an error, except for a repeat of a
/// rejection the CA gave moments ago (Envoy reconnecting), which is logged at
/// debug so that one refused workload does not flood the log.
pub(crate) fn log_refusal(stream: u64, what: &str, e: &SecretError) {
    if e.is_repeat() {
        tracing::debug!(stream, "{what}");
    } else {
        tracing::error!(stream, "{what}");
    }
}

/// The gRPC status a stream ends with for a secret failure.
pub(crate) fn status_for(e: &SecretError) -> Status {
    let msg = e.to_string();
    match e {
        SecretError::Credential(_) => Status::unauthenticated(msg),
        SecretError::Login(err) | SecretError::Sign { error: err, .. } => match err {
            crate::ca::CaError::Rejected(_) | crate::ca::CaError::RecentlyRejected(_) => {
                Status::permission_denied(msg)
            }
            crate::ca::CaError::Unavailable(_) => Status::unavailable(msg),
            crate::ca::CaError::BadAnswer(_) => Status::internal(msg),
        },
        SecretError::LimitReached { .. } => Status::resource_exhausted(msg),
        SecretError::Internal(_) => Status::internal(msg),
    }
}

/// The gRPC service.
pub struct SdsService {
    manager: Arc<SecretManager>,
    token_path: Option<PathBuf>,
    shutdown: watch::Receiver<bool>,
    next_stream: AtomicU64,
}

impl SdsService {
    pub fn new(
        manager: Arc<SecretManager>,
        token_path: Option<PathBuf>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            manager,
            token_path,
            shutdown,
            next_stream: AtomicU64::new(1),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "DeltaSecrets is not supported; use StreamSecrets (state of the world)",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let credential =
            CredentialSource::from_metadata(request.metadata(), self.token_path.as_deref());
        tracing::debug!(stream = id, "SDS stream opened");
        let (tx, rx) = mpsc::channel(4);
        let s = stream::SdsStream::new(
            id,
            self.manager.clone(),
            credential,
            tx,
            self.shutdown.clone(),
        );
        tokio::spawn(s.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let credential =
            CredentialSource::from_metadata(request.metadata(), self.token_path.as_deref());
        let req = request.into_inner();
        if let Err(msg) = resources::check_names(&req.resource_names) {
            tracing::warn!(resources = ?req.resource_names, "refusing FetchSecrets: {msg}");
            return Err(Status::invalid_argument(msg));
        }
        let credential = credential.get().inspect_err(|s| {
            tracing::warn!(resources = ?req.resource_names, "refusing FetchSecrets: {}", s.message());
        })?;
        let sub = self.manager.subscribe(&credential).await.map_err(|e| {
            let what = format!(
                "Failed to sign cert for {:?}: {e}",
                req.resource_names.join(",")
            );
            log_refusal(0, &what, &e);
            Status::new(status_for(&e).code(), what)
        })?;
        let state = sub.secret.borrow().clone();
        let secret = state
            .secret
            .ok_or_else(|| Status::internal("no secret after a successful fetch"))?;
        let roots = state.roots;
        let nonce = format!("fetch-{}", self.next_stream.fetch_add(1, Ordering::Relaxed));
        let snap = resources::Snapshot {
            secret: &secret,
            roots: &roots,
        };
        Ok(Response::new(resources::response(
            &req.resource_names,
            &snap,
            nonce,
        )))
    }
}
/// Serves SDS on `listener` until `shutdown` turns true; then stops accepting,
/// ends every stream and returns once connections are closed (or after a
/// grace period).
pub async fn serve(
    listener: tokio::net::UnixListener,
    manager: Arc<SecretManager>,
    token_path: Option<PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let service = SdsService::new(manager, token_path, shutdown.clone());
    let incoming = UnixListenerStream::new(listener);
    let signal = async move {
        let _ = shutdown.wait_for(|v| *v).await;
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(SecretDiscoveryServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, signal);
    server.await
}

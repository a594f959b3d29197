//! The SPIFFE Workload API (`standards/workloadapi.proto` of spiffe/spiffe)
//! on a second Unix socket, `WORKLOAD_API_SOCKET`, for workloads that speak
//! neither SDS nor read files: SPIFFE libraries (go-spiffe, py-spiffe, the
//! `spiffe` crate) and SPIRE-aware proxies.
//!
//! - `FetchX509SVID` streams the workload's X.509-SVID (DER chain, leaf
//!   first; PKCS#8 key; the trust bundle), again on every rotation and root
//!   change. `FetchX509Bundles` streams the trust bundle.
//! - Every call must carry `workload.spiffe.io: true` (a browser cannot set
//!   it), else `INVALID_ARGUMENT` with SPIRE's message.
//! - The JWT-SVID methods answer `UNIMPLEMENTED`: Vault's PKI signs X.509 only.
//! - The Workload API carries no credential and the agent attests no
//!   process, so it serves only in one-workload mode: the caller is the
//!   workload whose token is at `WORKLOAD_TOKEN_PATH`, and its SVID is that
//!   workload's certificate from the same cache as SDS. Without a token file
//!   every call gets `PERMISSION_DENIED`.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::identity::Credential;
use crate::sds::{log_refusal, status_for, CredentialSource};
use crate::secrets::SecretManager;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb;
mod x509;

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use pb::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};
use x509::Snapshot;

/// The metadata every Workload API call must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// SPIRE's answer to a call without it (`INVALID_ARGUMENT`).
pub const SECURITY_HEADER_MISSING: &str = "security header missing from request";
/// The answer to the JWT-SVID methods (`UNIMPLEMENTED`).
pub const JWT_UNSUPPORTED: &str =
    "JWT-SVIDs are not supported by node-agent: its certificate authority \
     (Vault's PKI engine) signs X.509 certificates only; use FetchX509SVID or FetchX509Bundles";
/// The answer without a token file (`PERMISSION_DENIED`).
pub const NO_ONE_WORKLOAD: &str = "node-wide attestation is not supported: the Workload API carries no \
     credential and node-agent cannot tell apart the processes that share this socket, so it serves the \
     Workload API only in one-workload mode; set WORKLOAD_TOKEN_PATH to the workload's service-account token";

/// Requests are empty messages (the X.509 ones) or a few strings (the JWT
/// ones, refused): anything larger is not a Workload API client.
const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// A chain, a key and a bundle are a few KiB; this only catches a bug.
const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Open streams per connection: a client library opens one or two.
const CONNECTION_MAX_STREAMS: u32 = 16;
/// Open streams over all connections; past it a call gets RESOURCE_EXHAUSTED.
const MAX_STREAMS: usize = 256;
const MAX_HEADER_BYTES: u32 = 16 * 1024;
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The gRPC service.
pub struct WorkloadApiService {
    manager: Arc<SecretManager>,
    token_path: Option<PathBuf>,
    shutdown: watch::Receiver<bool>,
    streams: Arc<Semaphore>,
    next_stream: AtomicU64,
}

impl WorkloadApiService {
    pub fn new(
        manager: Arc<SecretManager>,
        token_path: Option<PathBuf>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            manager,
            token_path,
            shutdown,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            next_stream: AtomicU64::new(1),
        }
    }

    /// The checks every X.509 call passes before anything is fetched: the
    /// security header, one-workload mode, a place under the stream cap,
    /// and a readable token.
    fn admit(
        &self,
        method: &str,
        md: &MetadataMap,
    ) -> Result<(u64, Credential, OwnedSemaphorePermit), Status> {
        check_header(md)?;
        let Some(path) = &self.token_path else {
            tracing::warn!(
                "refusing Workload API {method}: no WORKLOAD_TOKEN_PATH (one-workload mode only)"
            );
            return Err(Status::permission_denied(NO_ONE_WORKLOAD));
        };
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!(
                "refusing Workload API {method}: {MAX_STREAMS} streams already open"
            );
            Status::resource_exhausted(format!(
                "the Workload API already serves {MAX_STREAMS} streams, its limit; close idle clients"
            ))
        })?;
        let credential = CredentialSource::TokenFile(path.clone())
            .get()
            .inspect_err(|s| tracing::warn!("refusing Workload API {method}: {}", s.message()))?;
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        Ok((id, credential, permit))
    }

    /// Opens a stream that sends `build(snapshot)` now and again whenever
    /// `version(snapshot)` changes.
    fn open<T: Send + 'static>(
        &self,
        method: &'static str,
        md: &MetadataMap,
        version: fn(&Snapshot<'_>) -> String,
        build: fn(&Snapshot<'_>) -> Result<T, Status>,
    ) -> Result<Response<BoxStream<T>>, Status> {
        let (id, credential, permit) = self.admit(method, md)?;
        let (tx, rx) = mpsc::channel(2);
        let stream = ApiStream {
            id,
            method,
            manager: self.manager.clone(),
            shutdown: self.shutdown.clone(),
            out: tx,
            _permit: permit,
        };
        tokio::spawn(stream.run(credential, version, build));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// SPIRE's check: exactly one `workload.spiffe.io` value, and it is `true`.
fn check_header(md: &MetadataMap) -> Result<(), Status> {
    let mut values = md.get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument(SECURITY_HEADER_MISSING)),
    }
}

/// Resolves once the agent is shutting down.
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

/// One open stream of either X.509 method.
struct ApiStream<T> {
    id: u64,
    method: &'static str,
    manager: Arc<SecretManager>,
    shutdown: watch::Receiver<bool>,
    out: mpsc::Sender<Result<T, Status>>,
    /// Its place under the stream cap, held until it ends.
    _permit: OwnedSemaphorePermit,
}

impl<T> ApiStream<T> {
    async fn run(
        mut self,
        credential: Credential,
        version: fn(&Snapshot<'_>) -> String,
        build: fn(&Snapshot<'_>) -> Result<T, Status>,
    ) {
        let manager = self.manager.clone();
        let result = tokio::select! {
            r = manager.subscribe(&credential) => r,
            _ = self.out.closed() => return,
            _ = shutting_down(&mut self.shutdown) => return,
        };
        let mut sub = match result {
            Ok(sub) => sub,
            Err(e) => {
                let what = format!("Workload API {} failed: {e}", self.method);
                log_refusal(self.id, &what, &e);
                let _ = self
                    .out
                    .send(Err(Status::new(status_for(&e).code(), what)))
                    .await;
                return;
            }
        };
        tracing::debug!(stream = self.id, identity = %sub.identity, method = self.method, "Workload API stream opened");
        let mut sent: Option<String> = None;
        loop {
            let state = sub.secret.borrow().clone();
            if let Some(reason) = state.closed {
                let _ = self.out.send(Err(Status::unavailable(reason))).await;
                return;
            }
            if let Some(secret) = state.secret {
                let roots = sub.roots.borrow().clone();
                let snap = Snapshot {
                    secret: &secret,
                    roots: &roots,
                };
                let v = version(&snap);
                if sent.as_ref() != Some(&v) {
                    let problem = (self.method == "FetchX509SVID")
                        .then(|| x509::svid_problem(&snap))
                        .flatten();
                    if let Some(problem) = problem {
                        tracing::warn!(
                            stream = self.id,
                            identity = %sub.identity,
                            serial = %secret.leaf.serial_hex,
                            "Workload API: the certificate is not a valid X509-SVID and SPIFFE clients will refuse it: {problem}"
                        );
                    }
                    let msg = build(&snap);
                    let failed = msg.is_err();
                    if let Err(s) = &msg {
                        tracing::error!(stream = self.id, identity = %sub.identity, "Workload API {}: {}", self.method, s.message());
                    } else {
                        tracing::info!(
                            stream = self.id,
                            identity = %sub.identity,
                            serial = %secret.leaf.serial_hex,
                            roots = roots.pems.len(),
                            "Workload API: {} sent",
                            self.method
                        );
                    }
                    if self.out.send(msg).await.is_err() || failed {
                        return;
                    }
                    sent = Some(v);
                }
            }
            tokio::select! {
                r = sub.secret.changed() => if r.is_err() { break },
                r = sub.roots.changed() => if r.is_err() { break },
                _ = self.out.closed() => break,
                _ = shutting_down(&mut self.shutdown) => {
                    let _ = self.out.send(Err(Status::unavailable("node-agent is shutting down"))).await;
                    break;
                }
            }
        }
        tracing::debug!(
            stream = self.id,
            method = self.method,
            "Workload API stream done"
        );
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApiService {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.open(
            "FetchX509SVID",
            request.metadata(),
            x509::svid_version,
            x509::svid_response,
        )
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.open(
            "FetchX509Bundles",
            request.metadata(),
            x509::bundles_version,
            x509::bundles_response,
        )
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(request.metadata())?;
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(request.metadata())?;
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(request.metadata())?;
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }
}

/// Binds `WORKLOAD_API_SOCKET` when it is set and serves the Workload API
/// there until shutdown, then removes the socket.
pub fn start(
    config: &crate::config::Config,
    manager: &Arc<SecretManager>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, crate::sds::uds::SocketError> {
    let Some(path) = config.surfaces.workload_api_socket.clone() else {
        return Ok(None);
    };
    let listener = crate::sds::uds::bind_for(&path, "WORKLOAD_API_SOCKET")?;
    if config.workload_token_path.is_none() {
        tracing::warn!(
            "WORKLOAD_API_SOCKET is set without WORKLOAD_TOKEN_PATH: every Workload API call will be refused \
             with PERMISSION_DENIED, as node-wide attestation is not supported"
        );
    }
    tracing::info!(
        "SPIFFE Workload API server start, listen {:?}",
        path.display().to_string()
    );
    let service = WorkloadApiService::new(
        manager.clone(),
        config.workload_token_path.clone(),
        shutdown.clone(),
    );
    let shutdown = shutdown.clone();
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = serve(listener, service, shutdown).await {
            tracing::error!(path = %path.display(), "the Workload API server failed: {e}");
        }
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), "cannot remove the Workload API socket: {e}");
            }
        }
        tracing::info!("Workload API server stopped");
    })))
}

/// Serves the Workload API on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::UnixListener,
    service: WorkloadApiService,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let signal = async move {
        let _ = shutdown.wait_for(|v| *v).await;
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE.0))
        .http2_keepalive_timeout(Some(KEEPALIVE.1))
        .http2_max_header_list_size(MAX_HEADER_BYTES)
        .max_concurrent_streams(CONNECTION_MAX_STREAMS)
        .add_service(
            SpiffeWorkloadApiServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal)
        .await
}

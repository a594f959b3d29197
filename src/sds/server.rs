//! The gRPC side of the SDS server: HTTP/2 settings, routes, message size
//! limits, and `FetchSecrets` (the codec is [`super::codec`]).
//!
//! The routes are written here rather than taken from the generated
//! `SecretDiscoveryServiceServer` for two reasons: a stream's place under
//! the stream caps must be taken before its request is read, and a message
//! that is not a valid protobuf is the client's fault (`INVALID_ARGUMENT`),
//! while the generated code's codec calls it `INTERNAL`.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::server::{ClientStreamingService, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use super::codec::grpc_for;
use super::connection::{incoming, Admission, ConnInfo, Connection};
use super::credential::CredentialSource;
use super::delta;
use super::framing::RequestReader;
use super::limits::{more, Limits, WithSlot};
use super::resources::{self, names_for_log, NamesError, ResourceNames};
use super::stream::SdsStream;
use crate::config::SdsLimits;
use crate::metrics::{self, Refusal};
use crate::secrets::{SecretError, SecretManager};

/// The service name, the prefix of every route.
pub const SERVICE_NAME: &str = "envoy.service.secret.v3.SecretDiscoveryService";
const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const FETCH_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// Largest response the agent sends: a chain, a key and a root bundle are a
/// few KiB; this only catches a bug (or a CA answering megabytes of roots).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// HTTP/2 flow-control windows: what a client can make the agent hold in
/// HTTP/2 buffers before the agent reads it is at most a stream window per
/// open stream. Requests are read as they arrive (see `framing`), so small
/// windows cost an Envoy's 60 KiB request only a few window updates on a
/// local socket.
const STREAM_WINDOW: u32 = 16 * 1024;

/// The connection window holds a stream window for every stream HTTP/2
/// admits on the connection, and one more: streams waiting for the
/// buffered-request budget (see `framing`) leave their stream window's worth
/// unread, and the stream that holds the budget must still get the rest of
/// its request. (At 64 KiB, four waiting streams stalled their connection
/// until `SDS_FIRST_REQUEST_TIMEOUT`.) It adds nothing to what a client can
/// make the agent hold: that is still a stream window per stream.
fn connection_window(h2_streams: u32) -> u32 {
    STREAM_WINDOW
        .saturating_mul(h2_streams.saturating_add(1))
        .clamp(64 * 1024, (1 << 31) - 1)
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

/// What the handlers share.
pub struct SdsService {
    pub(crate) manager: Arc<SecretManager>,
    pub(crate) token_path: Option<PathBuf>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) limits: Arc<Limits>,
    next_stream: AtomicU64,
}

impl SdsService {
    pub fn new(
        manager: Arc<SecretManager>,
        token_path: Option<PathBuf>,
        shutdown: watch::Receiver<bool>,
        limits: Arc<Limits>,
    ) -> Arc<Self> {
        Arc::new(Self {
            manager,
            token_path,
            shutdown,
            limits,
            next_stream: AtomicU64::new(1),
        })
    }

    /// A new stream's id, for the log (and its nonces).
    pub(crate) fn next_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Logs why a request was refused (see [`Limits::log_refusal`]).
    pub(crate) fn log_refusal(&self, stream: u64, what: &str, e: &SecretError) {
        self.limits.log_refusal(stream, what, e);
    }

    /// Logs and counts a secret failure that ends a stream serving `names`;
    /// the status to end it with.
    pub(crate) fn refusal(&self, stream: u64, names: &str, e: &SecretError) -> Status {
        let what = format!("Failed to sign cert for {names:?}: {e}");
        self.log_refusal(stream, &what, e);
        Status::new(status_for(e).code(), what)
    }

    /// Routes one HTTP/2 stream: takes its place under the stream caps (or
    /// refuses it), arms the first-request deadline, and calls the method.
    async fn route(self: Arc<Self>, req: http::Request<Body>) -> http::Response<Body> {
        let path = req.uri().path().to_string();
        let path = path.as_str();
        if ![STREAM_SECRETS, DELTA_SECRETS, FETCH_SECRETS].contains(&path) {
            return Status::unimplemented(format!("no method {}", resources::shorten(path, 128)))
                .into_http();
        }
        let Some(ConnInfo(conn)) = req.extensions().get::<ConnInfo>().cloned() else {
            tracing::error!("an SDS request without connection state; refusing it");
            return Status::internal("no connection state").into_http();
        };
        let slot = match self.limits.open_stream(&conn) {
            Ok(s) => s,
            Err(status) => return status.into_http(),
        };
        // Requests are read by the agent's own reader (see `framing`); tonic
        // gets an empty body and only encodes the responses.
        let (parts, body) = req.into_parts();
        let reader = Some(self.limits.reader(body));
        let req = http::Request::from_parts(parts, Body::empty());
        let resp = match path {
            STREAM_SECRETS => {
                let method = StreamingMethod::<DiscoveryRequest, _> {
                    service: self.clone(),
                    conn,
                    reader,
                    open: SdsService::stream_secrets,
                    _request: PhantomData,
                };
                grpc_for::<DiscoveryResponse, DiscoveryRequest>()
                    .streaming(method, req)
                    .await
            }
            DELTA_SECRETS => {
                let method = StreamingMethod::<DeltaDiscoveryRequest, _> {
                    service: self.clone(),
                    conn,
                    reader,
                    open: delta::open,
                    _request: PhantomData,
                };
                grpc_for::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>()
                    .streaming(method, req)
                    .await
            }
            _ => {
                let method = FetchSecretsMethod {
                    service: self.clone(),
                    conn,
                    reader,
                };
                grpc_for::<DiscoveryResponse, DiscoveryRequest>()
                    .client_streaming(method, req)
                    .await
            }
        };
        resp.map(|inner| Body::new(WithSlot { inner, slot }))
    }

    /// Logs a stream ended for its credential (see
    /// [`Limits::credential_ended`]).
    pub(crate) fn credential_ended(&self, stream: u64, status: &Status) {
        self.limits.credential_ended(stream, status);
    }

    /// Logs why a stream's request could not be read (see
    /// [`Limits::inbound_error`]).
    pub(crate) fn inbound_error(&self, stream: u64, conn: &Connection, status: &Status) {
        self.limits.inbound_error(stream, conn, status);
    }

    async fn fetch_secrets(
        &self,
        conn: &Connection,
        metadata: &MetadataMap,
        mut reader: RequestReader,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let id = self.next_stream_id();
        let credential = CredentialSource::from_metadata_on(
            metadata,
            self.token_path.as_deref(),
            Some(&conn.last_credential),
        );
        let req = match reader
            .message::<super::framing::RequestWithoutNode>()
            .await
            .map(|m| m.map(DiscoveryRequest::from))
        {
            Ok(Some(req)) => req,
            Ok(None) => {
                return Err(Status::invalid_argument(
                    "FetchSecrets carries one DiscoveryRequest; none came",
                ))
            }
            Err(status) => {
                self.inbound_error(id, conn, &status);
                return Err(status);
            }
        };
        let names = ResourceNames::parse(&req.resource_names, self.limits.config().max_resource_names)
            .map_err(|e| {
                metrics::refused(Refusal::InvalidRequest);
                let key = match e {
                    NamesError::TooMany { .. } => "SDS_MAX_RESOURCE_NAMES",
                    _ => "FetchSecrets: resource names",
                };
                if let Some(n) = self.limits.throttle(key) {
                    tracing::warn!(connection = conn.id, resources = %names_for_log(&req.resource_names), "refusing FetchSecrets: {e}{}", more(n));
                }
                Status::invalid_argument(e.to_string())
            })?;
        let credential = credential.get().inspect_err(|s| {
            metrics::refused(Refusal::Credential);
            if let Some(n) = self.limits.throttle("FetchSecrets: credential") {
                tracing::warn!(connection = conn.id, resources = %names, "refusing FetchSecrets: {}{}", s.message(), more(n));
            }
        })?;
        let failed = |e: SecretError| self.refusal(id, &names.to_string(), &e);
        let admission: Admission = conn.admit(&credential).map_err(failed)?;
        let sub = self.manager.subscribe(&credential).await.map_err(failed)?;
        drop(admission);
        let state = sub.secret.borrow().clone();
        let secret = state
            .secret
            .ok_or_else(|| Status::internal("no secret after a successful fetch"))?;
        let roots = state.roots;
        for name in names.as_slice() {
            metrics::pushed(name);
        }
        let snap = resources::Snapshot {
            secret: &secret,
            roots: &roots,
        };
        Ok(Response::new(resources::response(
            &names,
            &snap,
            format!("fetch-{id}"),
        )))
    }

    fn stream_secrets(
        self: &Arc<Self>,
        conn: Arc<Connection>,
        metadata: &MetadataMap,
        reader: RequestReader,
    ) -> Response<BoxStream<DiscoveryResponse>> {
        let id = self.next_stream_id();
        let credential = CredentialSource::from_metadata_on(
            metadata,
            self.token_path.as_deref(),
            Some(&conn.last_credential),
        );
        tracing::debug!(stream = id, connection = conn.id, "SDS stream opened");
        let (tx, rx) = mpsc::channel(2);
        let s = SdsStream::new(id, self.clone(), conn, credential, tx);
        tokio::spawn(s.run(reader));
        Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(rx),
            |item| *item,
        )))
    }
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Opens one stream of a streaming method (`StreamSecrets`, `DeltaSecrets`).
type OpenStream<Resp> =
    fn(&Arc<SdsService>, Arc<Connection>, &MetadataMap, RequestReader) -> Response<BoxStream<Resp>>;

/// The methods get the request's metadata from tonic (whose body is empty)
/// and read the request messages from the agent's own reader.
struct StreamingMethod<Req, Resp> {
    service: Arc<SdsService>,
    conn: Arc<Connection>,
    reader: Option<RequestReader>,
    open: OpenStream<Resp>,
    _request: PhantomData<fn(Req)>,
}

impl<Req, Resp> StreamingService<Req> for StreamingMethod<Req, Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type ResponseStream = BoxStream<Resp>;
    type Future = futures::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Req>>) -> Self::Future {
        let Some(reader) = self.reader.take() else {
            return futures::future::ready(Err(Status::internal("called twice")));
        };
        futures::future::ready(Ok((self.open)(
            &self.service,
            self.conn.clone(),
            request.metadata(),
            reader,
        )))
    }
}

struct FetchSecretsMethod {
    service: Arc<SdsService>,
    conn: Arc<Connection>,
    reader: Option<RequestReader>,
}

impl ClientStreamingService<DiscoveryRequest> for FetchSecretsMethod {
    type Response = DiscoveryResponse;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Response<DiscoveryResponse>, Status>> + Send>,
    >;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let service = self.service.clone();
        let conn = self.conn.clone();
        let reader = self.reader.take();
        Box::pin(async move {
            let reader = reader.ok_or_else(|| Status::internal("called twice"))?;
            service
                .fetch_secrets(&conn, request.metadata(), reader)
                .await
        })
    }
}

/// The tower service tonic's server runs.
#[derive(Clone)]
pub struct SdsRouter(Arc<SdsService>);

impl tonic::codegen::Service<http::Request<Body>> for SdsRouter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { Ok(service.route(req).await) })
    }
}

impl NamedService for SdsRouter {
    const NAME: &'static str = SERVICE_NAME;
}

/// [`serve_with_limits`] with the default bounds.
pub async fn serve(
    listener: tokio::net::UnixListener,
    manager: Arc<SecretManager>,
    token_path: Option<PathBuf>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    serve_with_limits(
        listener,
        manager,
        token_path,
        SdsLimits::default(),
        shutdown,
    )
    .await
}

/// Serves SDS on `listener` within `limits` until `shutdown` turns true; then
/// stops accepting, ends every stream and returns once connections are
/// closed (or after a grace period).
pub async fn serve_with_limits(
    listener: tokio::net::UnixListener,
    manager: Arc<SecretManager>,
    token_path: Option<PathBuf>,
    limits: SdsLimits,
    shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    serve_within(listener, manager, token_path, Limits::new(limits), shutdown).await
}

/// [`serve_with_limits`] under bounds shared with another server of the
/// agent (the Workload API's): its connections and streams count against
/// the same caps.
pub async fn serve_within(
    listener: tokio::net::UnixListener,
    manager: Arc<SecretManager>,
    token_path: Option<PathBuf>,
    limits: Arc<Limits>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let service = SdsService::new(manager, token_path, shutdown.clone(), limits.clone());
    let signal = async move {
        let _ = shutdown.wait_for(|v| *v).await;
    };
    http2_server(limits.config())
        .add_service(SdsRouter(service))
        .serve_with_incoming_shutdown(incoming(listener, limits), signal)
        .await
}

/// A gRPC server with the HTTP/2 settings of the agent's bounds: keep-alive,
/// header list size, streams per connection, flow-control windows.
pub(crate) fn http2_server(cfg: &SdsLimits) -> tonic::transport::Server {
    // The protocol's own cap on streams per connection is above ours, so
    // that a stream past ours reaches the agent and gets RESOURCE_EXHAUSTED
    // naming the setting (a client at the protocol cap only queues, silently).
    let h2_streams = u32::try_from(
        cfg.connection_max_streams
            .saturating_mul(2)
            .max(cfg.connection_max_streams + 4),
    )
    .unwrap_or(u32::MAX);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .http2_max_header_list_size(cfg.max_header_bytes)
        .max_concurrent_streams(h2_streams)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(h2_streams))
        .max_frame_size(16 * 1024)
}

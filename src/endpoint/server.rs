//! The HTTP/2 server every socket of the agent runs, and the glue between
//! tonic and a protocol: the accept loop under the bounds, a stream's
//! admission before its request is read, and a method's response (answered
//! once, or a stream's [`StreamBody`]) over the agent's own request reader.
//!
//! Routes are written by each protocol rather than taken from generated
//! servers for two reasons: a stream's place under the stream caps must be
//! taken before its request is read, and a message that is not a valid
//! protobuf is the client's fault (`INVALID_ARGUMENT`), while generated code
//! calls it `INTERNAL`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::Status;

use super::caps::Caps;
use super::codec;
use super::connection::{incoming, ConnInfo, Connection};
use super::framing::RequestReader;
use super::limits::{Guarded, Limits, StreamGuard};
use super::responses::StreamBody;
use super::unproven::Proof;
use crate::config::SdsLimits;

/// HTTP/2 flow-control windows: what a client can make the agent hold in
/// HTTP/2 buffers before the agent reads it is at most a stream window per
/// open stream, and the rest of a message the stream has taken from the
/// request budget (`framing` lends the stream window for it once the
/// message's size is known, so that an Envoy's 60 KiB request arrives
/// after one window update, not one per 16 KiB).
pub(crate) const STREAM_WINDOW: u32 = 16 * 1024;

/// The connection window holds a stream window for every stream HTTP/2
/// admits on the connection, and one more: streams waiting for the
/// buffered-request budget (see `framing`) leave their stream window's worth
/// unread, and the stream that holds the budget must still get the rest of
/// its request (at 64 KiB, four waiting streams stalled their connection
/// until `SDS_FIRST_REQUEST_TIMEOUT`). It adds nothing to what a client can
/// make the agent hold: that is still a stream window per stream.
fn connection_window(h2_streams: u32) -> u32 {
    STREAM_WINDOW
        .saturating_mul(h2_streams.saturating_add(1))
        .clamp(64 * 1024, (1 << 31) - 1)
}

/// A gRPC server with the HTTP/2 settings of the agent's bounds: keep-alive,
/// header list size, streams per connection, flow-control windows.
pub fn http2_server(cfg: &SdsLimits) -> tonic::transport::Server {
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

/// A protocol's routes: which method an HTTP/2 stream calls, and the call.
/// Admission is not theirs: the [`Router`] admits every stream the same way
/// ([`Endpoint::admit`]) between the two.
pub trait Routes: Send + Sync + 'static {
    /// The gRPC service name, the prefix of every route.
    const NAME: &'static str;
    /// A method of the protocol.
    type Method: Send + 'static;

    /// The endpoint the protocol is served through.
    fn endpoint(&self) -> &Endpoint;

    /// The method `req` calls, or the answer refusing it; decided before
    /// anything is admitted or read, so it costs the client's peers nothing.
    #[allow(clippy::result_large_err)]
    fn method(&self, req: &http::Request<Body>) -> Result<Self::Method, http::Response<Body>>;

    /// Calls `method` for an admitted stream; `req`'s body is empty (the
    /// stream's requests are read from `admitted.reader`).
    fn call(
        self: Arc<Self>,
        method: Self::Method,
        admitted: Admitted,
        req: http::Request<Body>,
    ) -> RouteFuture;
}

/// What [`Routes::call`] returns.
pub type RouteFuture = Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;

/// The tower service tonic's server runs for a protocol's [`Routes`].
pub struct Router<R>(pub Arc<R>);

impl<R> Clone for Router<R> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<R: Routes> tonic::codegen::Service<http::Request<Body>> for Router<R> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let routes = self.0.clone();
        Box::pin(async move {
            let method = match routes.method(&req) {
                Ok(m) => m,
                Err(refused) => return Ok(refused),
            };
            let (admitted, guard, req) = match routes.endpoint().admit(req) {
                Ok(a) => a,
                Err(refused) => return Ok(refused),
            };
            let resp = routes.call(method, admitted, req).await;
            Ok(resp.map(|inner| {
                Body::new(Guarded {
                    inner,
                    guard,
                    evicted: false,
                })
            }))
        })
    }
}

impl<R: Routes> NamedService for Router<R> {
    const NAME: &'static str = R::NAME;
}

/// Serves `routes` on `listener` within the shared `limits` and the
/// socket's own `caps` until `shutdown` turns true; then stops accepting,
/// and returns once connections are closed.
pub async fn serve<R: Routes>(
    listener: tokio::net::UnixListener,
    routes: Arc<R>,
    endpoint: &Endpoint,
) -> Result<(), tonic::transport::Error> {
    let mut shutdown = endpoint.shutdown.clone();
    let signal = async move {
        let _ = shutdown.wait_for(|v| *v).await;
    };
    let accepted = incoming(listener, endpoint.limits.clone(), endpoint.caps.clone());
    http2_server(endpoint.limits.config())
        .add_service(Router(routes))
        .serve_with_incoming_shutdown(accepted, signal)
        .await
}

/// What every protocol of one socket shares: the bounds (shared with the
/// other sockets) and the socket's own caps, the shutdown signal, and the
/// ids of its streams.
pub struct Endpoint {
    pub limits: Arc<Limits>,
    pub caps: Option<Arc<Caps>>,
    pub shutdown: watch::Receiver<bool>,
    next_stream: AtomicU64,
}

/// A stream admitted under the bounds: its connection and the reader of its
/// requests.
pub struct Admitted {
    pub conn: Arc<Connection>,
    pub reader: RequestReader,
    /// Whether the stream has proven a credential: until it has, it makes
    /// room for newcomers at `SDS_MAX_STREAMS` (see [`super::unproven`]).
    pub proof: Arc<Proof>,
}

impl Endpoint {
    pub fn new(
        limits: Arc<Limits>,
        caps: Option<Arc<Caps>>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            limits,
            caps,
            shutdown,
            next_stream: AtomicU64::new(1),
        })
    }

    /// A new stream's id, for the log (and its nonces).
    pub fn next_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Admits one HTTP/2 stream before anything of its request is read: its
    /// place under the socket's caps, then under the shared stream caps.
    /// Its requests are read by the agent's own reader ([`RequestReader`]);
    /// tonic gets the request with an empty body and only encodes the
    /// responses. On refusal, the response to send.
    #[allow(clippy::result_large_err)]
    pub fn admit(
        &self,
        req: http::Request<Body>,
    ) -> Result<(Admitted, StreamGuard, http::Request<Body>), http::Response<Body>> {
        let Some(ConnInfo(conn)) = req.extensions().get::<ConnInfo>().cloned() else {
            tracing::error!("a request without connection state; refusing it");
            return Err(Status::internal("no connection state").into_http());
        };
        // The socket's own cap first, so that its clients cannot take the
        // places other sockets' clients need.
        let place = match &self.caps {
            None => None,
            Some(caps) => Some(caps.open_stream(&self.limits).map_err(Status::into_http)?),
        };
        let slot = self.limits.open_stream(&conn).map_err(Status::into_http)?;
        let (mut parts, body) = req.into_parts();
        let window = parts.extensions.remove::<h2::StreamWindow>();
        let reader = self.limits.reader(body, window);
        let req = http::Request::from_parts(parts, Body::empty());
        let proof = slot.proof.clone();
        Ok((
            Admitted {
                conn,
                reader,
                proof,
            },
            StreamGuard { slot, place },
            req,
        ))
    }
}

/// Serves a streaming method: `open` gets the request's metadata (its body
/// is read by the stream's own reader) and returns the body that runs the
/// stream and frames its responses ([`StreamBody`]). A request that says
/// its messages are compressed gets tonic's refusal (`UNIMPLEMENTED`:
/// node-agent accepts none).
pub fn answer_stream<T: prost::Message + Send + 'static>(
    req: http::Request<Body>,
    open: impl FnOnce(MetadataMap) -> StreamBody<T>,
) -> http::Response<Body> {
    let (parts, _) = req.into_parts();
    if let Err(status) = codec::identity_encoding(&parts.headers) {
        return status.into_http();
    }
    codec::grpc_response(Body::new(open(MetadataMap::from_headers(parts.headers))))
}

/// Serves a method answered once (client streaming, as `FetchSecrets`):
/// `answer` gets the request's metadata (its body is read by the stream's
/// own reader, in the context), and its message or status is sent as
/// tonic's codec sends one ([`codec::once`]). Without tonic's server codec:
/// it would build a decoder only to drop it, and a stream and a buffer to
/// encode one message. A request that says its messages are compressed
/// gets tonic's refusal (`UNIMPLEMENTED`: node-agent accepts none).
pub async fn answer_once<M, F>(
    req: http::Request<Body>,
    answer: impl FnOnce(MetadataMap) -> F,
) -> http::Response<Body>
where
    M: prost::Message,
    F: Future<Output = Result<M, Status>>,
{
    let (parts, _) = req.into_parts();
    if let Err(status) = codec::identity_encoding(&parts.headers) {
        return status.into_http();
    }
    match answer(MetadataMap::from_headers(parts.headers)).await {
        Ok(msg) => codec::once(&msg),
        Err(status) => status.into_http(),
    }
}

//! The Workload API's routes: the checks every call passes before it costs
//! anything (the security header, one-workload mode), its place under the
//! stream caps, and the two X.509 streams. Written as the SDS server's
//! routes are, for the same reasons: the stream's place is taken before its
//! request is read, and the request is read by the agent's own reader, with
//! its size, time and buffer bounds.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::{NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use super::caps::{incoming_within, ApiCaps};
use super::pb::{X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse};
use super::stream::{ApiStream, Kind};
use super::x509;
use crate::sds::codec::grpc_for;
use crate::sds::connection::{ConnInfo, Connection};
use crate::sds::framing::RequestReader;
use crate::sds::limits::{more, Limits, WithSlot};
use crate::sds::resources::shorten;
use crate::sds::server::{http2_server, BoxStream};
use crate::secrets::SecretManager;

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

/// The service name, the prefix of every route.
const SERVICE_NAME: &str = "SpiffeWorkloadAPI";
const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
const FETCH_X509_BUNDLES: &str = "/SpiffeWorkloadAPI/FetchX509Bundles";
const JWT_METHODS: [&str; 3] = [
    "/SpiffeWorkloadAPI/FetchJWTSVID",
    "/SpiffeWorkloadAPI/FetchJWTBundles",
    "/SpiffeWorkloadAPI/ValidateJWTSVID",
];

/// What the routes share.
pub struct WorkloadApiService {
    pub(super) manager: Arc<SecretManager>,
    token_path: Option<PathBuf>,
    pub(super) limits: Arc<Limits>,
    caps: Arc<ApiCaps>,
    pub(super) shutdown: watch::Receiver<bool>,
    next_stream: AtomicU64,
}

impl WorkloadApiService {
    pub fn new(
        manager: Arc<SecretManager>,
        token_path: Option<PathBuf>,
        limits: Arc<Limits>,
        caps: Arc<ApiCaps>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            manager,
            token_path,
            limits,
            caps,
            shutdown,
            next_stream: AtomicU64::new(1),
        })
    }

    /// Logs a refusal a client may repeat (one line per interval per kind)
    /// and returns its status.
    fn refuse(&self, key: &'static str, method: &str, status: Status) -> http::Response<Body> {
        if let Some(n) = self.limits.throttle(key) {
            tracing::warn!(
                "refusing Workload API {}: {}{}",
                method.rsplit('/').next().unwrap_or(method),
                status.message(),
                more(n)
            );
        }
        status.into_http()
    }

    /// Routes one HTTP/2 stream.
    async fn route(self: Arc<Self>, req: http::Request<Body>) -> http::Response<Body> {
        let path = req.uri().path().to_string();
        let path = path.as_str();
        let kind = match path {
            FETCH_X509_SVID => Some(Kind::Svid),
            FETCH_X509_BUNDLES => Some(Kind::Bundles),
            p if JWT_METHODS.contains(&p) => None,
            _ => {
                return Status::unimplemented(format!("no method {}", shorten(path, 128)))
                    .into_http()
            }
        };
        if !has_security_header(req.headers()) {
            return self.refuse(
                "Workload API: security header",
                path,
                Status::invalid_argument(SECURITY_HEADER_MISSING),
            );
        }
        let Some(kind) = kind else {
            return Status::unimplemented(JWT_UNSUPPORTED).into_http();
        };
        let Some(token_path) = self.token_path.clone() else {
            return self.refuse(
                "Workload API: no WORKLOAD_TOKEN_PATH",
                path,
                Status::permission_denied(NO_ONE_WORKLOAD),
            );
        };
        let Some(ConnInfo(conn)) = req.extensions().get::<ConnInfo>().cloned() else {
            tracing::error!("a Workload API request without connection state; refusing it");
            return Status::internal("no connection state").into_http();
        };
        // Its own cap first, so that it cannot take the SDS socket's places.
        let place = match self.caps.open_stream(&self.limits) {
            Ok(p) => p,
            Err(status) => return status.into_http(),
        };
        let slot = match self.limits.open_stream(&conn) {
            Ok(s) => s,
            Err(status) => return status.into_http(),
        };
        let (parts, body) = req.into_parts();
        let reader = Some(self.limits.reader(body));
        let req = http::Request::from_parts(parts, Body::empty());
        let resp = match kind {
            Kind::Svid => {
                let method = X509Method::<X509svidRequest, X509svidResponse> {
                    service: self.clone(),
                    conn,
                    reader,
                    token_path,
                    kind,
                    build: x509::svid_response,
                    _types: PhantomData,
                };
                grpc_for::<X509svidResponse, X509svidRequest>()
                    .streaming(method, req)
                    .await
            }
            Kind::Bundles => {
                let method = X509Method::<X509BundlesRequest, X509BundlesResponse> {
                    service: self.clone(),
                    conn,
                    reader,
                    token_path,
                    kind,
                    build: x509::bundles_response,
                    _types: PhantomData,
                };
                grpc_for::<X509BundlesResponse, X509BundlesRequest>()
                    .streaming(method, req)
                    .await
            }
        };
        resp.map(|inner| {
            Body::new(WithSlot {
                inner: WithPlace {
                    inner,
                    _place: place,
                },
                slot,
            })
        })
    }
}

/// SPIRE's check: exactly one `workload.spiffe.io` value, and it is `true`.
fn has_security_header(headers: &http::HeaderMap) -> bool {
    let mut values = headers.get_all(SECURITY_HEADER).iter();
    matches!((values.next(), values.next()), (Some(v), None) if v == "true")
}

/// One X.509 method: tonic gets an empty body and encodes the responses;
/// the request is read by the stream from the agent's own reader.
struct X509Method<Req, Resp> {
    service: Arc<WorkloadApiService>,
    conn: Arc<Connection>,
    reader: Option<RequestReader>,
    token_path: PathBuf,
    kind: Kind,
    build: x509::Build<Resp>,
    _types: PhantomData<fn(Req)>,
}

impl<Req, Resp> StreamingService<Req> for X509Method<Req, Resp>
where
    Req: Message + Default + Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type ResponseStream = BoxStream<Resp>;
    type Future = futures::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, _request: Request<Streaming<Req>>) -> Self::Future {
        let Some(reader) = self.reader.take() else {
            return futures::future::ready(Err(Status::internal("called twice")));
        };
        let id = self.service.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(2);
        let stream = ApiStream {
            id,
            kind: self.kind,
            service: self.service.clone(),
            conn: self.conn.clone(),
            out: tx,
            shutdown: self.service.shutdown.clone(),
        };
        tokio::spawn(stream.run::<Req>(reader, self.token_path.clone(), self.build));
        futures::future::ready(Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as BoxStream<Resp>
        )))
    }
}

/// The tower service tonic's server runs.
#[derive(Clone)]
pub struct WorkloadApiRouter(Arc<WorkloadApiService>);

impl tonic::codegen::Service<http::Request<Body>> for WorkloadApiRouter {
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

impl NamedService for WorkloadApiRouter {
    const NAME: &'static str = SERVICE_NAME;
}

/// Serves the Workload API on `listener` until `shutdown` turns true, with
/// the HTTP/2 settings and under the bounds of `service`'s limits.
pub async fn serve(
    listener: tokio::net::UnixListener,
    service: Arc<WorkloadApiService>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let (limits, caps) = (service.limits.clone(), service.caps.clone());
    let signal = async move {
        let _ = shutdown.wait_for(|v| *v).await;
    };
    http2_server(limits.config())
        .add_service(WorkloadApiRouter(service))
        .serve_with_incoming_shutdown(incoming_within(listener, limits, caps), signal)
        .await
}

/// A response body that holds its stream's place under
/// `WORKLOAD_API_MAX_STREAMS` until hyper drops it.
struct WithPlace {
    inner: Body,
    _place: super::caps::ApiStreamPlace,
}

impl http_body::Body for WithPlace {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

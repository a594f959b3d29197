//! The SDS service (`envoy.service.secret.v3.SecretDiscoveryService`): its
//! routes, `FetchSecrets`, and how the server is started. A stream's
//! admission, its bounds and its framing are the endpoint's
//! ([`crate::endpoint`]); `StreamSecrets` and `DeltaSecrets` are
//! [`super::stream`] and [`super::delta`].

use std::path::PathBuf;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::Status;

use super::delta::DeltaStream;
use super::request::RequestWithoutNode;
use super::resources::{self, names_for_log, NamesError, ResourceNames, SdsResponse};
use super::stream::SdsStream;
use crate::config::SdsLimits;
use crate::driver::fetch::identity_state;
use crate::driver::run::{start, Outbound, Protocol};
use crate::driver::{failed_to_sign, status_for, Driver, Surface};
use crate::endpoint::connection::Admission;
use crate::endpoint::credential::{CredentialSource, TokenFile};
use crate::endpoint::limits::{more, Limits};
use crate::endpoint::responses::StreamBody;
use crate::endpoint::server::{answer_once, answer_stream, Admitted, RouteFuture, Routes};
use crate::endpoint::warn::shorten;
use crate::endpoint::Endpoint;
use crate::metrics::{self, Refusal};
use crate::secrets::{SecretError, SecretManager};

/// The service name, the prefix of every route.
pub const SERVICE_NAME: &str = "envoy.service.secret.v3.SecretDiscoveryService";
const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const FETCH_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";
const DELTA_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// What the routes share.
pub struct SdsService {
    pub(crate) manager: Arc<SecretManager>,
    /// `WORKLOAD_TOKEN_PATH`, for requests that carry no credential.
    pub(crate) token_file: Option<TokenFile>,
    pub(crate) endpoint: Arc<Endpoint>,
}

impl SdsService {
    /// The shared bounds.
    pub(crate) fn limits(&self) -> &Limits {
        &self.endpoint.limits
    }

    async fn fetch_secrets(
        &self,
        admitted: Admitted,
        metadata: MetadataMap,
    ) -> Result<SdsResponse, Status> {
        let Admitted {
            conn,
            mut reader,
            proof,
        } = admitted;
        let id = self.endpoint.next_stream_id();
        let credential = CredentialSource::from_metadata_on(
            &metadata,
            self.token_file.as_ref(),
            Some(&conn.last_credential),
        );
        let req = match reader
            .message::<RequestWithoutNode>()
            .await
            .map(|m| m.map(DiscoveryRequest::from))
        {
            Ok(Some(req)) => req,
            Ok(None) => {
                return Err(Status::invalid_argument(
                    "FetchSecrets carries one DiscoveryRequest; none came",
                ))
            }
            Err(e) => {
                self.limits().inbound_error(id, &conn, &e);
                return Err(e.status());
            }
        };
        let names = ResourceNames::parse(&req.resource_names, self.limits().config().max_resource_names)
            .map_err(|e| {
                metrics::refused(Refusal::InvalidRequest);
                let key = match e {
                    NamesError::TooMany { .. } => "SDS_MAX_RESOURCE_NAMES",
                    _ => "FetchSecrets: resource names",
                };
                if let Some(n) = self.limits().throttle(key) {
                    tracing::warn!(connection = conn.id, resources = %names_for_log(&req.resource_names), "refusing FetchSecrets: {e}{}", more(n));
                }
                Status::invalid_argument(e.to_string())
            })?;
        let credential = credential.get(&self.manager.clock()).inspect_err(|s| {
            metrics::refused(Refusal::Credential);
            if let Some(n) = self.limits().throttle("FetchSecrets: credential") {
                tracing::warn!(connection = conn.id, resources = %names, "refusing FetchSecrets: {}{}", s.message(), more(n));
            }
        })?;
        let failed = |e: SecretError| {
            let what = failed_to_sign(&names.to_string(), &e);
            self.limits().log_refusal(id, &what, &e);
            Status::new(status_for(&e).code(), what)
        };
        let identity = identity_state(&self.manager, &credential);
        let admission: Admission = conn.admit(&credential, identity).map_err(failed)?;
        let sub = self.manager.subscribe(&credential).await.map_err(failed)?;
        conn.proven(admission);
        // The CA accepted the credential: the connection makes room for
        // newcomers no more.
        proof.prove();
        conn.prove();
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
        Ok(resources::response(&names, &snap, format!("fetch-{id}")))
    }
}

/// A stream of one of the two xDS protocols, as the routes open it.
pub(super) trait XdsStream: Protocol + Sized + 'static {
    /// How its streams are logged and treated.
    const SURFACE: &'static Surface;

    /// Its state, around `driver`, answering names up to `max_names`.
    fn new(driver: Driver, max_names: usize, out: Outbound<Self::Response>) -> Self;
}

/// Opens an xDS stream (once the router admitted it): its credential is the
/// request's header (the connection's last one when the bytes are the same)
/// or the token file.
fn open<P: XdsStream>(
    (service, admitted): (Arc<SdsService>, Admitted),
    metadata: MetadataMap,
) -> StreamBody<P::Response> {
    let max_names = service.limits().config().max_resource_names;
    start(
        P::SURFACE,
        &service.manager,
        &service.endpoint,
        admitted,
        |conn| {
            CredentialSource::from_metadata_on(
                &metadata,
                service.token_file.as_ref(),
                Some(&conn.last_credential),
            )
        },
        |driver, out| P::new(driver, max_names, out),
    )
}

/// The methods of the service.
#[derive(Debug, Clone, Copy)]
pub enum Method {
    Stream,
    Delta,
    Fetch,
}

impl Routes for SdsService {
    const NAME: &'static str = SERVICE_NAME;
    type Method = Method;

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn method(&self, req: &http::Request<Body>) -> Result<Method, http::Response<Body>> {
        match req.uri().path() {
            STREAM_SECRETS => Ok(Method::Stream),
            DELTA_SECRETS => Ok(Method::Delta),
            FETCH_SECRETS => Ok(Method::Fetch),
            path => {
                Err(Status::unimplemented(format!("no method {}", shorten(path, 128))).into_http())
            }
        }
    }

    fn call(
        self: Arc<Self>,
        method: Method,
        admitted: Admitted,
        req: http::Request<Body>,
    ) -> RouteFuture {
        let ctx = (self, admitted);
        match method {
            Method::Stream => Box::pin(std::future::ready(answer_stream(req, |metadata| {
                open::<SdsStream>(ctx, metadata)
            }))),
            Method::Delta => Box::pin(std::future::ready(answer_stream(req, |metadata| {
                open::<DeltaStream>(ctx, metadata)
            }))),
            Method::Fetch => Box::pin(answer_once(req, |metadata| async move {
                let (service, admitted) = ctx;
                service.fetch_secrets(admitted, metadata).await
            })),
        }
    }
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
    shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let endpoint = Endpoint::new(limits, None, shutdown);
    let service = Arc::new(SdsService {
        manager,
        token_file: token_path.map(TokenFile::new),
        endpoint: endpoint.clone(),
    });
    crate::endpoint::serve(listener, service, &endpoint).await
}

//! The Workload API's routes: the checks every call passes before it costs
//! anything (the security header, one-workload mode), then its admission by
//! the endpoint ([`crate::endpoint`]: its place under the caps, taken before
//! its request is read, and the agent's own request reader), then the two
//! X.509 streams.

use std::sync::Arc;

use tonic::body::Body;
use tonic::codegen::http;
use tonic::Status;

use super::pb::{X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse};
use super::stream::{self, Kind};
use crate::endpoint::credential::TokenFile;
use crate::endpoint::limits::more;
use crate::endpoint::server::{answer_stream, Admitted, RouteFuture, Routes};
use crate::endpoint::warn::shorten;
use crate::endpoint::Endpoint;
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
    /// `WORKLOAD_TOKEN_PATH`: the one workload served.
    pub(super) token_file: Option<TokenFile>,
    pub(super) endpoint: Arc<Endpoint>,
}

impl WorkloadApiService {
    /// Logs a refusal a client may repeat (one line per interval per kind)
    /// and returns its status.
    fn refuse(&self, key: &'static str, method: &str, status: Status) -> http::Response<Body> {
        if let Some(n) = self.endpoint.limits.throttle(key) {
            tracing::warn!(
                "refusing Workload API {}: {}{}",
                method.rsplit('/').next().unwrap_or(method),
                status.message(),
                more(n)
            );
        }
        status.into_http()
    }
}

impl Routes for WorkloadApiService {
    const NAME: &'static str = SERVICE_NAME;
    /// Which X.509 method, and the token file it serves from.
    type Method = (Kind, TokenFile);

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The checks every call passes before it costs anything: a method of
    /// the X.509 side, the security header, one-workload mode.
    fn method(&self, req: &http::Request<Body>) -> Result<(Kind, TokenFile), http::Response<Body>> {
        let path = req.uri().path();
        let kind = match path {
            FETCH_X509_SVID => Some(Kind::Svid),
            FETCH_X509_BUNDLES => Some(Kind::Bundles),
            p if JWT_METHODS.contains(&p) => None,
            _ => {
                return Err(
                    Status::unimplemented(format!("no method {}", shorten(path, 128))).into_http(),
                )
            }
        };
        if !has_security_header(req.headers()) {
            return Err(self.refuse(
                "Workload API: security header",
                path,
                Status::invalid_argument(SECURITY_HEADER_MISSING),
            ));
        }
        let Some(kind) = kind else {
            return Err(Status::unimplemented(JWT_UNSUPPORTED).into_http());
        };
        let Some(token_file) = self.token_file.clone() else {
            return Err(self.refuse(
                "Workload API: no WORKLOAD_TOKEN_PATH",
                path,
                Status::permission_denied(NO_ONE_WORKLOAD),
            ));
        };
        Ok((kind, token_file))
    }

    fn call(
        self: Arc<Self>,
        (kind, token_file): (Kind, TokenFile),
        admitted: Admitted,
        req: http::Request<Body>,
    ) -> RouteFuture {
        let ctx = (self, admitted, token_file, kind);
        match kind {
            Kind::Svid => Box::pin(std::future::ready(answer_stream(req, |metadata| {
                stream::open::<X509svidRequest, X509svidResponse>(ctx, metadata)
            }))),
            Kind::Bundles => Box::pin(std::future::ready(answer_stream(req, |metadata| {
                stream::open::<X509BundlesRequest, X509BundlesResponse>(ctx, metadata)
            }))),
        }
    }
}

/// SPIRE's check: exactly one `workload.spiffe.io` value, and it is `true`.
fn has_security_header(headers: &http::HeaderMap) -> bool {
    let mut values = headers.get_all(SECURITY_HEADER).iter();
    matches!((values.next(), values.next()), (Some(v), None) if v == "true")
}

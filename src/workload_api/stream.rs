//! One open `FetchX509SVID` or `FetchX509Bundles` stream: its request is
//! read (within the first-request deadline), the workload's token file is
//! proven to the CA under the connection's login budget by the stream's
//! [`Driver`], and a message is sent now and again whenever what it carries
//! changes.

use std::marker::PhantomData;
use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::Status;

use super::pb::{X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse};
use super::server::WorkloadApiService;
use super::x509::{self, Snapshot};
use crate::driver::run::{fail, send, start, Handler, Outbound, Parts, Protocol, Step};
use crate::driver::{Driver, Surface, Want};
use crate::endpoint::credential::CredentialSource;
use crate::endpoint::credential::TokenFile;
use crate::endpoint::framing::Request;
use crate::endpoint::responses::StreamBody;
use crate::endpoint::server::Admitted;
use crate::secrets::SecretError;

/// Which X.509 method a stream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Svid,
    Bundles,
}

fn svid_failure(_: &str, e: &SecretError) -> String {
    format!("Workload API FetchX509SVID failed: {e}")
}

fn bundles_failure(_: &str, e: &SecretError) -> String {
    format!("Workload API FetchX509Bundles failed: {e}")
}

/// How the Workload API's streams are logged and treated: a failure of the
/// CA ends the stream (SPIFFE clients retry with their own back-off), and so
/// does shutdown, with `UNAVAILABLE`.
static SVID: Surface = Surface {
    name: "Workload API stream",
    refusing: "refusing Workload API FetchX509SVID",
    credential_key: "Workload API: credential",
    failure: svid_failure,
    retry_transient: false,
    counted: false,
    unavailable_at_shutdown: true,
};

static BUNDLES: Surface = Surface {
    name: "Workload API stream",
    refusing: "refusing Workload API FetchX509Bundles",
    credential_key: "Workload API: credential",
    failure: bundles_failure,
    retry_transient: false,
    counted: false,
    unavailable_at_shutdown: true,
};

impl Kind {
    fn method(self) -> &'static str {
        match self {
            Kind::Svid => "FetchX509SVID",
            Kind::Bundles => "FetchX509Bundles",
        }
    }

    /// [`Self::method`], as something to show.
    fn method_name(self) -> &'static &'static str {
        match self {
            Kind::Svid => &"FetchX509SVID",
            Kind::Bundles => &"FetchX509Bundles",
        }
    }

    fn surface(self) -> &'static Surface {
        match self {
            Kind::Svid => &SVID,
            Kind::Bundles => &BUNDLES,
        }
    }

    /// Changes whenever what the method sends does.
    fn version(self, snap: &Snapshot<'_>) -> String {
        match self {
            Kind::Svid => x509::svid_version(snap),
            Kind::Bundles => x509::bundles_version(snap),
        }
    }
}

/// A message one of the X.509 methods sends.
pub(super) trait X509Message: prost::Message + Send + 'static {
    fn build(snap: &Snapshot<'_>) -> Result<Self, Status>
    where
        Self: Sized;
}

/// Workload API requests are small and read whole.
impl Request for X509svidRequest {}
impl Request for X509BundlesRequest {}

impl X509Message for X509svidResponse {
    fn build(snap: &Snapshot<'_>) -> Result<Self, Status> {
        x509::svid_response(snap)
    }
}

impl X509Message for X509BundlesResponse {
    fn build(snap: &Snapshot<'_>) -> Result<Self, Status> {
        x509::bundles_response(snap)
    }
}

/// Opens a stream of `kind` (called by the router once the stream has its
/// place under the caps).
pub(super) fn open<Req, Resp>(
    (service, admitted, token_file, kind): (Arc<WorkloadApiService>, Admitted, TokenFile, Kind),
    _metadata: MetadataMap,
) -> StreamBody<Resp>
where
    Req: Request + Send + 'static,
    Resp: X509Message,
{
    start(
        kind.surface(),
        &service.manager,
        &service.endpoint,
        admitted,
        |_| CredentialSource::TokenFile(token_file),
        |driver, out| ApiStream::<Req, Resp> {
            kind,
            driver,
            out,
            sent: None,
            _request: PhantomData,
        },
    )
}

/// One open stream of either X.509 method: the version last sent; the
/// identity side is its [`Driver`], and its loop [`run`].
struct ApiStream<Req, T> {
    kind: Kind,
    driver: Driver,
    out: Outbound<T>,
    sent: Option<String>,
    _request: PhantomData<fn(Req)>,
}

impl<Req, T> Protocol for ApiStream<Req, T>
where
    Req: Request + Send + 'static,
    T: X509Message,
{
    type Request = Req;
    type Response = T;
    const ONE_REQUEST: bool = true;

    fn parts(&mut self) -> Parts<'_, T> {
        Parts {
            what: self.kind.method_name(),
            driver: &mut self.driver,
            out: &self.out,
        }
    }

    /// The request carries nothing: the token file is proven, then served.
    fn on_request(&mut self, _req: Req) -> Handler<'_> {
        Box::pin(async move {
            match self.driver.want(&self.kind.method()) {
                Ok(Want::Now) => self.send_changed().await,
                Ok(Want::Waiting) => Step::Continue,
                Err(status) => fail(&self.out, status).await,
            }
        })
    }

    fn send(&mut self, fetched: Option<bool>) -> Handler<'_> {
        if fetched.is_some() {
            if let Some(identity) = self.driver.identity() {
                tracing::debug!(
                    stream = self.driver.id(),
                    identity,
                    method = self.kind.method(),
                    "Workload API stream opened"
                );
            }
        }
        Box::pin(self.send_changed())
    }

    fn no_request(&mut self) -> Status {
        Status::invalid_argument(format!(
            "{} carries one request message; none came",
            self.kind.method()
        ))
    }
}

impl<Req, T: X509Message> ApiStream<Req, T> {
    /// Sends the message if what it carries changed since last sent.
    async fn send_changed(&mut self) -> Step {
        let id = self.driver.id();
        let served = match self.driver.served() {
            Err(status) => return fail(&self.out, status).await,
            Ok(None) => return Step::Continue,
            Ok(Some(served)) => served,
        };
        let (secret, roots) = (&served.secret, &served.roots);
        let snap = Snapshot { secret, roots };
        let v = self.kind.version(&snap);
        if self.sent.as_ref() == Some(&v) {
            return Step::Continue;
        }
        match T::build(&snap) {
            Err(status) => {
                tracing::error!(stream = id, identity = %secret.identity, "Workload API {}: {}", self.kind.method(), status.message());
                fail(&self.out, status).await
            }
            Ok(msg) => {
                tracing::info!(
                    stream = id,
                    identity = %secret.identity,
                    serial = %secret.leaf.serial_hex,
                    roots = roots.pems.len(),
                    "Workload API: {} sent",
                    self.kind.method()
                );
                self.sent = Some(v);
                send(&self.out, msg).await
            }
        }
    }
}

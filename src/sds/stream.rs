//! One `StreamSecrets` stream: the xDS state-of-the-world state machine.
//!
//! - Each response carries a version and a fresh nonce.
//! - A request echoing the last nonce, naming the same set of resources
//!   (order and repeats aside) and without `error_detail`, is an ACK: no
//!   reply.
//! - The same with `error_detail` is a NACK: logged, and the same secret is
//!   not sent again; the next change is.
//! - A request echoing the last nonce with a different set of names, NACK
//!   or not, is a new subscription, answered at once.
//! - A request whose nonce is not the last one sent is stale and ignored.
//! - When the identity's secret or the trust bundle changes, the resources
//!   that changed are pushed.
//!
//! The identity side (the credential, the fetch, changes, expiry) is the
//! stream's [`Driver`]; the stream keeps reading requests while a fetch
//! waits on the CA.

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use tonic::Status;

use super::request::RequestWithoutNode;
use super::resources::{
    self, names_for_log, resource_version, NamesError, ResourceNames, SdsResponse,
};
use super::sent::Sent;
use super::service::XdsStream;
use crate::driver::run::{fail, send, Handler, Outbound, Parts, Protocol, Step};
use crate::driver::{Driver, Surface, Want};
use crate::endpoint::limits::more;
use crate::endpoint::warn::shorten;
use crate::metrics::{self, Refusal};

/// How `StreamSecrets` streams are logged and treated.
static SURFACE: Surface = Surface::xds(
    "SDS stream",
    "refusing SDS request",
    "StreamSecrets: credential",
);

/// State of one stream: the xDS bookkeeping; the identity side is its
/// [`Driver`], and its loop [`run`].
pub(super) struct SdsStream {
    driver: Driver,
    max_names: usize,
    out: Outbound<SdsResponse>,
    /// What the client is subscribed to (served or about to be).
    names: ResourceNames,
    /// Names a fetch will serve when it ends.
    pending_names: Option<ResourceNames>,
    last_nonce: Option<String>,
    sent_versions: Sent<String>,
    nonce_counter: u64,
}

impl Protocol for SdsStream {
    type Request = RequestWithoutNode;
    type Response = SdsResponse;

    fn parts(&mut self) -> Parts<'_, SdsResponse> {
        Parts {
            what: self.pending_names.as_ref().unwrap_or(&self.names),
            driver: &mut self.driver,
            out: &self.out,
        }
    }

    fn on_request(&mut self, req: RequestWithoutNode) -> Handler<'_> {
        Box::pin(self.answer(DiscoveryRequest::from(req)))
    }

    fn send(&mut self, fetched: Option<bool>) -> Handler<'_> {
        if fetched.is_some() {
            if let Some(names) = self.pending_names.take() {
                self.names = names;
            }
        }
        Box::pin(self.send_current(fetched.unwrap_or(false)))
    }
}

impl XdsStream for SdsStream {
    const SURFACE: &'static Surface = &SURFACE;

    fn new(driver: Driver, max_names: usize, out: Outbound<SdsResponse>) -> Self {
        Self {
            names: ResourceNames::default(),
            pending_names: None,
            last_nonce: None,
            sent_versions: Sent::default(),
            nonce_counter: 0,
            driver,
            max_names,
            out,
        }
    }
}

impl SdsStream {
    fn id(&self) -> u64 {
        self.driver.id()
    }

    /// Answers one request.
    async fn answer(&mut self, req: DiscoveryRequest) -> Step {
        if !req.type_url.is_empty() && req.type_url != resources::SECRET_TYPE_URL {
            metrics::refused(Refusal::InvalidRequest);
            return self
                .fail(Status::invalid_argument(format!(
                    "unsupported type_url {:?}; this service serves {}",
                    shorten(&req.type_url, 128),
                    resources::SECRET_TYPE_URL
                )))
                .await;
        }
        let kind = classify(
            self.last_nonce.as_deref(),
            &self.names,
            &req.response_nonce,
            &req.resource_names,
            req.error_detail.is_some(),
        );
        match (kind, &req.error_detail) {
            (Kind::Stale, _) => {
                tracing::debug!(stream = self.id(), nonce = %shorten(&req.response_nonce, 64), "ignoring SDS request with a stale nonce");
                return Step::Continue;
            }
            (Kind::Ack, _) => {
                tracing::debug!(stream = self.id(), version = %shorten(&req.version_info, 128), "SDS ACK");
                return Step::Continue;
            }
            (Kind::Nack | Kind::NackAndSubscribe, Some(err)) => {
                metrics::nack();
                if let Some(n) = self.driver.limits().throttle("NACK") {
                    tracing::warn!(
                        stream = self.id(),
                        identity = ?self.driver.identity(),
                        resources = %self.names,
                        version = %shorten(&req.version_info, 128),
                        code = err.code,
                        "Envoy rejected the SDS response (NACK): {}; the same secret will not be sent again, the next change will be{}",
                        shorten(&err.message, 512),
                        more(n)
                    );
                }
                if kind == Kind::Nack {
                    return Step::Continue;
                }
            }
            _ => {}
        }
        self.subscribe(&req.resource_names).await
    }

    /// A first request, or one that changes the subscription.
    async fn subscribe(&mut self, requested: &[String]) -> Step {
        let names = match ResourceNames::parse(requested, self.max_names) {
            Ok(n) => n,
            Err(e) => {
                metrics::refused(Refusal::InvalidRequest);
                let key = match e {
                    NamesError::TooMany { .. } => "SDS_MAX_RESOURCE_NAMES",
                    _ => "StreamSecrets: resource names",
                };
                if let Some(n) = self.driver.limits().throttle(key) {
                    tracing::warn!(stream = self.id(), connection = self.driver.conn().id, resources = %names_for_log(requested), "refusing SDS request: {e}{}", more(n));
                }
                return self.fail(Status::invalid_argument(e.to_string())).await;
            }
        };
        match self.driver.want(&names) {
            // The identity this credential proved is being served: only the
            // names change.
            Ok(Want::Now) => {
                self.pending_names = None;
                self.names = names;
                self.send_current(true).await
            }
            // Its fetch is under way: it will serve these names.
            Ok(Want::Waiting) => {
                self.pending_names = Some(names);
                Step::Continue
            }
            Err(status) => self.fail(status).await,
        }
    }

    /// Sends the subscribed resources if any changed since last sent (or always).
    async fn send_current(&mut self, always: bool) -> Step {
        let Some(served) = (match self.driver.served() {
            Ok(served) => served,
            Err(status) => return self.fail(status).await,
        }) else {
            return Step::Continue;
        };
        let (secret, roots) = (&served.secret, &served.roots);
        let snap = resources::Snapshot { secret, roots };
        let versions = Sent::from_pairs(
            self.names
                .as_slice()
                .iter()
                .map(|n| (n.clone(), resource_version(n, &snap))),
        );
        if !always && versions == self.sent_versions {
            return Step::Continue;
        }
        self.nonce_counter += 1;
        let nonce = format!("{:x}-{}", self.id(), self.nonce_counter);
        let resp = resources::response(&self.names, &snap, nonce.clone());
        tracing::info!(
            stream = self.id(),
            identity = %secret.identity,
            resources = %self.names,
            version = %resp.version_info,
            "SDS: push"
        );
        self.last_nonce = Some(nonce);
        self.sent_versions = versions;
        for name in self.names.as_slice() {
            metrics::pushed(name);
        }
        send(&self.out, resp).await
    }

    async fn fail(&mut self, status: Status) -> Step {
        fail(&self.out, status).await
    }
}

/// What a request means to a stream in its current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Echoes a nonce that is not the last one sent: ignored.
    Stale,
    /// Accepts the last response.
    Ack,
    /// Rejects the last response, same names: no reply.
    Nack,
    /// Rejects the last response and names other resources: answered.
    NackAndSubscribe,
    /// A first request, or a changed set of names: answered.
    Subscribe,
}

/// Classifies a request (pure, so that it can be tested on any input).
pub(crate) fn classify(
    last_nonce: Option<&str>,
    names: &ResourceNames,
    nonce: &str,
    requested: &[String],
    nack: bool,
) -> Kind {
    if nonce.is_empty() {
        return Kind::Subscribe;
    }
    if last_nonce != Some(nonce) {
        return Kind::Stale;
    }
    match (names.same_set(requested), nack) {
        (true, false) => Kind::Ack,
        (true, true) => Kind::Nack,
        (false, true) => Kind::NackAndSubscribe,
        (false, false) => Kind::Subscribe,
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;

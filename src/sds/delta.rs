//! One `DeltaSecrets` stream: Envoy's incremental (delta) xDS, served from
//! the same secret manager as `StreamSecrets`, under the same bounds.
//!
//! The rules, from Envoy's `discovery.proto` and `xds_protocol.rst`:
//! - `resource_names_subscribe` adds names, `resource_names_unsubscribe`
//!   removes them; either may ride on any request, ACKs included.
//! - Every response carries a nonce no other response of this agent carries.
//! - A request with `response_nonce` ACKs that response, or NACKs it when it
//!   has `error_detail`. Neither is answered. A NACKed version is not sent
//!   again; the next change is.
//! - A response carries one resource per changed subscribed name, each with
//!   its name and version (Envoy's SDS NACKs a response with more than one
//!   secret for a subscription).
//! - A subscribe is always answered with the resource, even when
//!   `initial_resource_versions` says the client already has that version: a
//!   client reconnecting may have dropped it (envoyproxy/gateway#9519).
//! - `removed_resources` names only what cannot be served (unknown names).
//! - A nonce this stream never sent (a previous stream's, or a previous
//!   agent's) is ignored, not treated as an error.
//!
//! The bounds are `StreamSecrets`' own, from the same code: the stream's
//! place under the stream caps and its requests' size and deadlines are
//! taken by the endpoint ([`crate::endpoint`]); a request naming more than
//! `SDS_MAX_RESOURCE_NAMES` distinct names (to subscribe, or to
//! unsubscribe) is refused with `INVALID_ARGUMENT`; the identity side
//! (credential, fetch under the login budgets, changes, expiry)
//! is the stream's [`Driver`]; refusals are logged once per interval.

use std::collections::VecDeque;
use std::fmt;
use std::sync::OnceLock;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use tonic::Status;

use super::request::DeltaRequestWithoutNode;
use super::resources::{
    self, distinct, encode, names_for_log, resource_version, Snapshot, SECRET_TYPE_URL, SERVED,
};
use super::sent::Sent;
use super::service::XdsStream;
use crate::driver::run::{fail, send, Handler, Outbound, Parts, Protocol, Step};
use crate::driver::{Driver, Surface, Want};
use crate::endpoint::limits::more;
use crate::endpoint::warn::shorten;
use crate::metrics::{self, Refusal};

/// How `DeltaSecrets` streams are logged and treated.
static SURFACE: Surface = Surface::xds(
    "SDS delta stream",
    "refusing SDS delta request",
    "DeltaSecrets: credential",
);

/// Responses remembered for matching ACKs and NACKs; older nonces are
/// treated as unknown (ignored).
const NONCES_KEPT: usize = 8;

/// Served names, in `SERVED` order; shown joined by commas.
#[derive(Default)]
struct Subscribed(Vec<&'static str>);

impl fmt::Display for Subscribed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl std::ops::Deref for Subscribed {
    type Target = Vec<&'static str>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Subscribed {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A random tag of this agent process, in every nonce, so that a nonce from
/// a previous agent never matches one of this agent's responses.
fn process_tag() -> u32 {
    static TAG: OnceLock<u32> = OnceLock::new();
    *TAG.get_or_init(rand::random)
}

/// State of one delta stream: the delta xDS bookkeeping; the identity side
/// is its [`Driver`].
pub(super) struct DeltaStream {
    driver: Driver,
    max_names: usize,
    out: Outbound<DeltaDiscoveryResponse>,
    /// Served names the client is subscribed to, in `SERVED` order.
    subscribed: Subscribed,
    /// The version last sent for each subscribed name; a name without one is
    /// sent with the next response.
    sent: Sent<&'static str>,
    nonce_counter: u64,
    /// Recent responses: nonce and the (name, version) pairs they carried.
    unacked: VecDeque<(String, Vec<(&'static str, String)>)>,
}

impl Protocol for DeltaStream {
    type Request = DeltaRequestWithoutNode;
    type Response = DeltaDiscoveryResponse;

    fn parts(&mut self) -> Parts<'_, DeltaDiscoveryResponse> {
        Parts {
            what: &self.subscribed,
            driver: &mut self.driver,
            out: &self.out,
        }
    }

    fn on_request(&mut self, req: DeltaRequestWithoutNode) -> Handler<'_> {
        Box::pin(self.answer(req))
    }

    fn send(&mut self, _fetched: Option<bool>) -> Handler<'_> {
        Box::pin(self.send_changed())
    }
}

impl XdsStream for DeltaStream {
    const SURFACE: &'static Surface = &SURFACE;

    fn new(driver: Driver, max_names: usize, out: Outbound<DeltaDiscoveryResponse>) -> Self {
        Self {
            driver,
            max_names,
            out,
            subscribed: Subscribed::default(),
            sent: Sent::default(),
            unacked: VecDeque::new(),
            nonce_counter: 0,
        }
    }
}

impl DeltaStream {
    fn id(&self) -> u64 {
        self.driver.id()
    }

    /// Answers one request.
    async fn answer(&mut self, req: DeltaRequestWithoutNode) -> Step {
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            metrics::refused(Refusal::InvalidRequest);
            return self
                .fail(Status::invalid_argument(format!(
                    "unsupported type_url {:?}; this service serves {SECRET_TYPE_URL}",
                    shorten(&req.type_url, 128),
                )))
                .await;
        }
        // The names are checked before anything changes.
        let max = self.max_names;
        let lists = distinct(&req.resource_names_subscribe, max).and_then(|subscribe| {
            distinct(&req.resource_names_unsubscribe, max)
                .map(|unsubscribe| (subscribe, unsubscribe))
        });
        let (subscribe, unsubscribe) = match lists {
            Ok(lists) => lists,
            Err(e) => {
                metrics::refused(Refusal::InvalidRequest);
                if let Some(n) = self.driver.limits().throttle("SDS_MAX_RESOURCE_NAMES") {
                    tracing::warn!(
                        stream = self.id(),
                        connection = self.driver.conn().id,
                        subscribe = %names_for_log(&req.resource_names_subscribe),
                        unsubscribe = %names_for_log(&req.resource_names_unsubscribe),
                        "refusing SDS delta request: {e}{}",
                        more(n)
                    );
                }
                return self.fail(Status::invalid_argument(e.to_string())).await;
            }
        };
        if !req.response_nonce.is_empty() {
            self.on_ack(&req);
        }
        for name in unsubscribe {
            if let Some(i) = self.subscribed.iter().position(|n| n == name) {
                let name = self.subscribed.remove(i);
                self.sent.remove(name);
                tracing::debug!(
                    stream = self.id(),
                    resource = name,
                    "SDS delta: unsubscribed"
                );
            }
        }
        if !req.initial_resource_versions.is_empty() {
            tracing::debug!(
                stream = self.id(),
                versions = req.initial_resource_versions.len(),
                "SDS delta: the client reports versions it holds; every subscribed resource is sent anyway"
            );
        }
        let mut unknown = Vec::new();
        let mut served_subscribe = false;
        for name in subscribe {
            match SERVED.iter().find(|s| **s == name.as_str()) {
                Some(served) => {
                    served_subscribe = true;
                    if !self.subscribed.contains(served) {
                        self.subscribed.push(served);
                        self.subscribed
                            .sort_by_key(|n| SERVED.iter().position(|s| s == n));
                    }
                    // Always answered, whatever the client claims to hold.
                    self.sent.remove(served);
                }
                None => unknown.push(name.clone()),
            }
        }
        if !unknown.is_empty() && matches!(self.remove(unknown).await, Step::End) {
            return Step::End;
        }
        if self.subscribed.is_empty() {
            // Nothing left to serve: stop watching the identity.
            self.driver.stop();
            return Step::Continue;
        }
        if !served_subscribe {
            return Step::Continue;
        }
        self.serve().await
    }

    /// Answers subscriptions to names this agent does not serve with
    /// `removed_resources`.
    async fn remove(&mut self, unknown: Vec<String>) -> Step {
        metrics::refused(Refusal::InvalidRequest);
        if let Some(n) = self
            .driver
            .limits()
            .throttle("DeltaSecrets: resource names")
        {
            tracing::warn!(
                stream = self.id(),
                connection = self.driver.conn().id,
                resources = %names_for_log(&unknown),
                "SDS delta: subscription to unknown secret(s), answered as removed; this agent serves {}{}",
                SERVED.join(", "),
                more(n)
            );
        }
        let nonce = self.next_nonce();
        let resp = DeltaDiscoveryResponse {
            type_url: SECRET_TYPE_URL.to_string(),
            removed_resources: unknown,
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.remember(nonce, Vec::new());
        send(&self.out, resp).await
    }

    /// Serves the subscribed names from the identity the stream's credential
    /// proves: at once if it is the one being served, else after a fetch
    /// (whose result serves every name subscribed by then).
    async fn serve(&mut self) -> Step {
        match self.driver.want(&self.subscribed) {
            Ok(Want::Now) => self.send_changed().await,
            Ok(Want::Waiting) => Step::Continue,
            Err(status) => self.fail(status).await,
        }
    }

    /// Logs an ACK or a NACK. The NACKed version stays recorded as sent, so
    /// it is not sent again; a later change is.
    fn on_ack(&mut self, req: &DeltaRequestWithoutNode) {
        let Some(pos) = self
            .unacked
            .iter()
            .position(|(n, _)| *n == req.response_nonce)
        else {
            tracing::debug!(
                stream = self.id(),
                nonce = %shorten(&req.response_nonce, 64),
                "SDS delta: ignoring a nonce this stream did not send or no longer tracks"
            );
            return;
        };
        let (_, carried) = self.unacked.remove(pos).expect("position is in range");
        match &req.error_detail {
            Some(err) => {
                metrics::nack();
                if let Some(n) = self.driver.limits().throttle("NACK") {
                    tracing::warn!(
                        stream = self.id(),
                        identity = ?self.driver.identity(),
                        resources = ?carried,
                        code = err.code,
                        "Envoy rejected the SDS delta response (NACK): {}; the same version will not be sent again, the next change will be{}",
                        shorten(&err.message, 512),
                        more(n)
                    );
                }
            }
            None => tracing::debug!(stream = self.id(), resources = ?carried, "SDS delta ACK"),
        }
    }

    /// Sends every subscribed resource whose version differs from the one
    /// last sent (or that was never sent), one resource per name.
    async fn send_changed(&mut self) -> Step {
        let served = match self.driver.served() {
            Ok(Some(served)) => served,
            Ok(None) => return Step::Continue,
            Err(status) => return self.fail(status).await,
        };
        let secret = &served.secret;
        let snap = Snapshot {
            secret,
            roots: &served.roots,
        };
        let changed: Vec<(&'static str, String)> = self
            .subscribed
            .iter()
            .map(|n| (*n, resource_version(n, &snap)))
            .filter(|(n, v)| self.sent.get(n) != Some(v))
            .collect();
        if changed.is_empty() {
            return Step::Continue;
        }
        let resources: Vec<Resource> = changed
            .iter()
            .map(|(name, version)| Resource {
                name: name.to_string(),
                version: version.clone(),
                resource: Some(encode(name, &snap)),
                ..Default::default()
            })
            .collect();
        let nonce = self.next_nonce();
        let system_version_info = changed
            .iter()
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join("-");
        tracing::info!(
            stream = self.id(),
            identity = %secret.identity,
            resources = ?changed,
            "SDS delta: push"
        );
        for (name, version) in &changed {
            self.sent.insert(name, version.clone());
            metrics::pushed(name);
        }
        self.remember(nonce.clone(), changed);
        let resp = DeltaDiscoveryResponse {
            system_version_info,
            resources,
            type_url: resources::SECRET_TYPE_URL.to_string(),
            nonce,
            ..Default::default()
        };
        send(&self.out, resp).await
    }

    fn next_nonce(&mut self) -> String {
        self.nonce_counter += 1;
        format!(
            "{:08x}-{:x}-{}",
            process_tag(),
            self.id(),
            self.nonce_counter
        )
    }

    fn remember(&mut self, nonce: String, carried: Vec<(&'static str, String)>) {
        if self.unacked.len() == NONCES_KEPT {
            self.unacked.pop_front();
        }
        self.unacked.push_back((nonce, carried));
    }

    async fn fail(&mut self, status: Status) -> Step {
        fail(&self.out, status).await
    }
}

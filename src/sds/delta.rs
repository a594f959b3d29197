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
//! taken by the router ([`super::server`]) and the request reader
//! ([`super::framing`]); a request naming more than `SDS_MAX_RESOURCE_NAMES`
//! distinct names (to subscribe, or to unsubscribe) is refused with
//! `INVALID_ARGUMENT`; a fetch needs the connection's login budget
//! ([`FirstFetch::admit`]); refusals are logged once per interval.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Response, Status};

use super::connection::Connection;
use super::credential::CredentialSource;
use super::framing::RequestReader;
use super::limits::more;
use super::resources::{
    self, distinct, encode, names_for_log, resource_version, shorten, Snapshot, SECRET_TYPE_URL,
    SERVED,
};
use super::server::{BoxStream, SdsService};
use super::serving::{
    expired_status, next_event, refresh_fetch, shutting_down, CredentialDue, Current, Event,
    FirstFetch,
};
use crate::metrics::{self, Refusal};
use crate::secrets::{SecretError, SecretManager, Subscription};

pub(super) type Outbound = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// Responses remembered for matching ACKs and NACKs; older nonces are
/// treated as unknown (ignored).
const NONCES_KEPT: usize = 8;

/// Opens a `DeltaSecrets` stream (called by the router once the stream has
/// its place under the caps).
pub(super) fn open(
    service: &Arc<SdsService>,
    conn: Arc<Connection>,
    metadata: &MetadataMap,
    reader: RequestReader,
) -> Response<BoxStream<DeltaDiscoveryResponse>> {
    let id = service.next_stream_id();
    let credential = CredentialSource::from_metadata(metadata, service.token_path.as_deref());
    tracing::debug!(stream = id, connection = conn.id, "SDS delta stream opened");
    let (tx, rx) = mpsc::channel(2);
    let stream = DeltaStream::new(id, service.clone(), conn, credential, tx);
    tokio::spawn(stream.run(reader));
    Response::new(Box::pin(ReceiverStream::new(rx)))
}

/// A random tag of this agent process, in every nonce, so that a nonce from
/// a previous agent never matches one of this agent's responses.
fn process_tag() -> u32 {
    static TAG: OnceLock<u32> = OnceLock::new();
    *TAG.get_or_init(rand::random)
}

enum Step {
    Continue,
    End,
}

/// State of one delta stream.
pub(super) struct DeltaStream {
    id: u64,
    service: Arc<SdsService>,
    conn: Arc<Connection>,
    credential: CredentialSource,
    out: Outbound,
    /// Served names the client is subscribed to, in `SERVED` order.
    subscribed: Vec<&'static str>,
    /// The version last sent for each subscribed name; a name without one is
    /// sent with the next response.
    sent: HashMap<&'static str, String>,
    /// Recent responses: nonce and the (name, version) pairs they carried.
    unacked: VecDeque<(String, Vec<(&'static str, String)>)>,
    nonce_counter: u64,
    /// The identity being served, and the credential that proved it.
    current: Option<Current>,
    /// A subscription waiting for the CA.
    pending: Option<FirstFetch>,
    shutdown: watch::Receiver<bool>,
    /// Counts the stream in `node_agent_sds_streams_open` while it lives.
    _open: metrics::StreamOpen,
}

impl DeltaStream {
    fn new(
        id: u64,
        service: Arc<SdsService>,
        conn: Arc<Connection>,
        credential: CredentialSource,
        out: Outbound,
    ) -> Self {
        let shutdown = service.shutdown.clone();
        Self {
            id,
            service,
            conn,
            credential,
            out,
            subscribed: Vec::new(),
            sent: HashMap::new(),
            unacked: VecDeque::new(),
            nonce_counter: 0,
            current: None,
            pending: None,
            shutdown,
            _open: metrics::stream_opened(),
        }
    }

    /// Serves the stream until Envoy closes it, it fails, or shutdown.
    /// Requests keep being read while a fetch waits on the CA.
    async fn run(mut self, mut inbound: RequestReader) {
        let manager = self.service.manager.clone();
        loop {
            let step = tokio::select! {
                msg = inbound.message::<DeltaDiscoveryRequest>() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) => {
                        tracing::debug!(stream = self.id, "SDS delta stream closed by the client");
                        Step::End
                    }
                    Err(status) => {
                        self.service.inbound_error(self.id, &self.conn, &status);
                        self.fail(status).await
                    }
                },
                event = next_event(&mut self.current, self.credential.is_token_file()) => match event {
                    Event::Changed => self.on_changed().await,
                    Event::Dropped => Step::End,
                    Event::Credential(due) => self.on_credential_due(due).await,
                },
                result = progress(&mut self.pending, &manager) => self.on_fetched(result).await,
                _ = shutting_down(&mut self.shutdown) => Step::End,
            };
            if let Step::End = step {
                break;
            }
        }
        tracing::debug!(
            stream = self.id,
            identity = ?self.current.as_ref().map(|c| c.sub.identity.as_str()),
            "SDS delta stream done"
        );
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Step {
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
        let max = self.service.limits.config().max_resource_names;
        let lists = distinct(&req.resource_names_subscribe, max).and_then(|subscribe| {
            distinct(&req.resource_names_unsubscribe, max)
                .map(|unsubscribe| (subscribe, unsubscribe))
        });
        let (subscribe, unsubscribe) = match lists {
            Ok(lists) => lists,
            Err(e) => {
                metrics::refused(Refusal::InvalidRequest);
                if let Some(n) = self.service.limits.throttle("SDS_MAX_RESOURCE_NAMES") {
                    tracing::warn!(
                        stream = self.id,
                        connection = self.conn.id,
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
                tracing::debug!(stream = self.id, resource = name, "SDS delta: unsubscribed");
            }
        }
        if !req.initial_resource_versions.is_empty() {
            tracing::debug!(
                stream = self.id,
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
            self.current = None;
            self.pending = None;
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
        if let Some(n) = self.service.limits.throttle("DeltaSecrets: resource names") {
            tracing::warn!(
                stream = self.id,
                connection = self.conn.id,
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
        if self.out.send(Ok(resp)).await.is_err() {
            return Step::End;
        }
        Step::Continue
    }

    /// Serves the subscribed names from the identity the stream's credential
    /// proves: at once if it is the one being served, else after a fetch.
    async fn serve(&mut self) -> Step {
        let credential = match self.credential.get() {
            Ok(c) => c,
            Err(status) => {
                metrics::refused(Refusal::Credential);
                if let Some(n) = self.service.limits.throttle("DeltaSecrets: credential") {
                    tracing::warn!(
                        stream = self.id,
                        connection = self.conn.id,
                        resources = %self.subscribed.join(","),
                        "refusing SDS delta request: {}{}",
                        status.message(),
                        more(n)
                    );
                }
                return self.fail(status).await;
            }
        };
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.credential == credential)
        {
            self.pending = None;
            return self.send_changed().await;
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| *p.credential() == credential)
        {
            // Its result serves every name subscribed by then.
            return Step::Continue;
        }
        match FirstFetch::admit(&self.conn, credential) {
            Ok(fetch) => {
                self.pending = Some(fetch);
                Step::Continue
            }
            Err(e) => self.refuse(e).await,
        }
    }

    /// Logs an ACK or a NACK. The NACKed version stays recorded as sent, so
    /// it is not sent again; a later change is.
    fn on_ack(&mut self, req: &DeltaDiscoveryRequest) {
        let Some(pos) = self
            .unacked
            .iter()
            .position(|(n, _)| *n == req.response_nonce)
        else {
            tracing::debug!(
                stream = self.id,
                nonce = %shorten(&req.response_nonce, 64),
                "SDS delta: ignoring a nonce this stream did not send or no longer tracks"
            );
            return;
        };
        let (_, carried) = self.unacked.remove(pos).expect("position is in range");
        match &req.error_detail {
            Some(err) => {
                metrics::nack();
                if let Some(n) = self.service.limits.throttle("NACK") {
                    tracing::warn!(
                        stream = self.id,
                        identity = ?self.current.as_ref().map(|c| c.sub.identity.as_str()),
                        resources = ?carried,
                        code = err.code,
                        "Envoy rejected the SDS delta response (NACK): {}; the same version will not be sent again, the next change will be{}",
                        shorten(&err.message, 512),
                        more(n)
                    );
                }
            }
            None => tracing::debug!(stream = self.id, resources = ?carried, "SDS delta ACK"),
        }
    }

    /// A fetch ended.
    async fn on_fetched(&mut self, result: Result<Subscription, SecretError>) -> Step {
        match result {
            Ok(sub) => {
                let fetch = self
                    .pending
                    .take()
                    .expect("a fetch ended, so one was pending");
                self.current = Some(Current::new(fetch.into_credential(), sub));
                self.send_changed().await
            }
            Err(e) if e.is_transient() => {
                let fetch = self
                    .pending
                    .as_mut()
                    .expect("a fetch ended, so one was pending");
                let delay = fetch.retry_later();
                tracing::error!(
                    stream = self.id,
                    "Failed to sign cert for {:?}: {e}; retrying in {:.1}s",
                    self.subscribed.join(","),
                    delay.as_secs_f64()
                );
                Step::Continue
            }
            Err(e) => {
                self.pending = None;
                self.refuse(e).await
            }
        }
    }

    /// The identity's state changed: what changed is sent, unless the CA
    /// has meanwhile rejected the JWT this stream proved it with.
    async fn on_changed(&mut self) -> Step {
        if let Some(status) = self.current.as_ref().and_then(Current::rejection) {
            self.service.credential_ended(self.id, &status);
            return self.fail(status).await;
        }
        self.send_changed().await
    }

    /// The stream's JWT expired (the stream ends), or a token file may hold
    /// a new one (it is proven, and served from, while the old one still
    /// serves).
    async fn on_credential_due(&mut self, due: CredentialDue) -> Step {
        match due {
            CredentialDue::Expired(exp) => {
                let status = expired_status(exp, &self.credential);
                self.service.credential_ended(self.id, &status);
                self.fail(status).await
            }
            CredentialDue::Refresh => {
                let fetching = self.pending.is_some();
                if let Some(fetch) = refresh_fetch(
                    &self.conn,
                    &self.current,
                    &self.credential,
                    fetching,
                    self.id,
                ) {
                    self.pending = Some(fetch);
                }
                Step::Continue
            }
        }
    }

    /// Ends the stream for a secret failure, logged as such.
    async fn refuse(&mut self, e: SecretError) -> Step {
        let status = self
            .service
            .refusal(self.id, &self.subscribed.join(","), &e);
        self.fail(status).await
    }

    /// Sends every subscribed resource whose version differs from the one
    /// last sent (or that was never sent), one resource per name.
    async fn send_changed(&mut self) -> Step {
        let Some(current) = self.current.as_ref() else {
            return Step::Continue;
        };
        let state = current.sub.secret.borrow().clone();
        if let Some(reason) = state.closed {
            return self.fail(Status::unavailable(reason)).await;
        }
        let Some(secret) = state.secret else {
            return Step::Continue;
        };
        let snap = Snapshot {
            secret: &secret,
            roots: &state.roots,
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
            stream = self.id,
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
        if self.out.send(Ok(resp)).await.is_err() {
            return Step::End;
        }
        Step::Continue
    }

    fn next_nonce(&mut self) -> String {
        self.nonce_counter += 1;
        format!("{:08x}-{:x}-{}", process_tag(), self.id, self.nonce_counter)
    }

    fn remember(&mut self, nonce: String, carried: Vec<(&'static str, String)>) {
        if self.unacked.len() == NONCES_KEPT {
            self.unacked.pop_front();
        }
        self.unacked.push_back((nonce, carried));
    }

    async fn fail(&mut self, status: Status) -> Step {
        let _ = self.out.send(Err(status)).await;
        Step::End
    }
}

/// Drives the pending fetch (see [`FirstFetch::result`]); pending forever
/// when there is none.
async fn progress(
    pending: &mut Option<FirstFetch>,
    manager: &Arc<SecretManager>,
) -> Result<Subscription, SecretError> {
    match pending {
        Some(fetch) => fetch.result(manager).await,
        None => std::future::pending().await,
    }
}

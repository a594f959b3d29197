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
//! The stream keeps reading requests while a fetch waits on the CA (see
//! [`super::serving`]).

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::connection::Connection;
use super::credential::CredentialSource;
use super::framing::RequestReader;
use super::limits::more;
use super::resources::{self, names_for_log, resource_version, shorten, NamesError, ResourceNames};
use super::server::SdsService;
use super::serving::{
    expired_status, next_event, refresh_fetch, shutting_down, CredentialDue, Current, Event,
    FirstFetch,
};
use crate::metrics::{self, Refusal};
use crate::secrets::{SecretError, SecretManager, Subscription};

/// Where a stream's responses go. Boxed: a channel allocates its slots 32 at a
/// time whatever its bound, and an unboxed `Result<DiscoveryResponse, Status>`
/// slot is ~150 bytes, which made ~5 KiB per open stream.
pub(super) type Outbound = mpsc::Sender<Box<Result<DiscoveryResponse, Status>>>;

/// State of one stream.
pub(super) struct SdsStream {
    id: u64,
    service: Arc<SdsService>,
    conn: Arc<Connection>,
    credential: CredentialSource,
    out: Outbound,
    /// What the client is subscribed to (served or about to be).
    names: ResourceNames,
    last_nonce: Option<String>,
    sent_versions: HashMap<String, String>,
    nonce_counter: u64,
    /// The identity being served, and the credential that proved it.
    current: Option<Current>,
    /// A subscription waiting for the CA.
    pending: Option<Pending>,
    shutdown: watch::Receiver<bool>,
    /// Counts the stream in `node_agent_sds_streams_open` while it lives.
    _open: metrics::StreamOpen,
}

/// A subscription not served yet, and the names it will serve.
struct Pending {
    names: ResourceNames,
    fetch: FirstFetch,
}

enum Step {
    Continue,
    End,
}

impl SdsStream {
    pub fn new(
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
            names: ResourceNames::default(),
            last_nonce: None,
            sent_versions: HashMap::new(),
            nonce_counter: 0,
            current: None,
            pending: None,
            shutdown,
            _open: metrics::stream_opened(),
        }
    }

    /// Serves the stream until Envoy closes it, it fails, or shutdown.
    ///
    /// A client that half-closes (sends no more requests) is not cancelling:
    /// what it asked for is still answered, then the stream ends.
    ///
    /// The handlers are boxed: inline, their futures (a CA call among them)
    /// would be part of every open stream's resting task, ~4 KiB each; boxed,
    /// they take memory only while they run.
    pub async fn run(mut self, mut inbound: RequestReader) {
        let manager = self.service.manager.clone();
        let mut half_closed = false;
        loop {
            let step = tokio::select! {
                msg = inbound.message::<super::framing::RequestWithoutNode>(), if !half_closed => match msg.map(|m| m.map(DiscoveryRequest::from)) {
                    Ok(Some(req)) => Box::pin(self.on_request(req)).await,
                    Ok(None) if self.pending.is_some() => {
                        tracing::debug!(stream = self.id, "SDS stream half-closed by the client; answering its request first");
                        half_closed = true;
                        Step::Continue
                    }
                    Ok(None) => {
                        tracing::debug!(stream = self.id, "SDS stream closed by the client");
                        Step::End
                    }
                    Err(status) => {
                        self.service.inbound_error(self.id, &self.conn, &status);
                        self.fail(status).await
                    }
                },
                event = next_event(&mut self.current, self.credential.is_token_file()) => match event {
                    Event::Changed => Box::pin(self.on_changed()).await,
                    Event::Dropped => Step::End,
                    Event::Credential(due) => Box::pin(self.on_credential_due(due)).await,
                },
                result = progress(&mut self.pending, &manager) => match Box::pin(self.on_fetched(result)).await {
                    Step::Continue if half_closed && self.pending.is_none() => Step::End,
                    step => step,
                },
                _ = shutting_down(&mut self.shutdown) => Step::End,
            };
            if let Step::End = step {
                break;
            }
        }
        tracing::debug!(
            stream = self.id,
            identity = ?self.current.as_ref().map(|c| c.sub.identity.as_str()),
            "SDS stream done"
        );
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Step {
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
                tracing::debug!(stream = self.id, nonce = %shorten(&req.response_nonce, 64), "ignoring SDS request with a stale nonce");
                return Step::Continue;
            }
            (Kind::Ack, _) => {
                tracing::debug!(stream = self.id, version = %shorten(&req.version_info, 128), "SDS ACK");
                return Step::Continue;
            }
            (Kind::Nack | Kind::NackAndSubscribe, Some(err)) => {
                metrics::nack();
                if let Some(n) = self.service.limits.throttle("NACK") {
                    tracing::warn!(
                        stream = self.id,
                        identity = ?self.current.as_ref().map(|c| c.sub.identity.as_str()),
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
        let names = match ResourceNames::parse(
            requested,
            self.service.limits.config().max_resource_names,
        ) {
            Ok(n) => n,
            Err(e) => {
                metrics::refused(Refusal::InvalidRequest);
                let key = match e {
                    NamesError::TooMany { .. } => "SDS_MAX_RESOURCE_NAMES",
                    _ => "StreamSecrets: resource names",
                };
                if let Some(n) = self.service.limits.throttle(key) {
                    tracing::warn!(stream = self.id, connection = self.conn.id, resources = %names_for_log(requested), "refusing SDS request: {e}{}", more(n));
                }
                return self.fail(Status::invalid_argument(e.to_string())).await;
            }
        };
        let credential = match self.credential.get() {
            Ok(c) => c,
            Err(status) => {
                metrics::refused(Refusal::Credential);
                if let Some(n) = self.service.limits.throttle("StreamSecrets: credential") {
                    tracing::warn!(stream = self.id, connection = self.conn.id, resources = %names, "refusing SDS request: {}{}", status.message(), more(n));
                }
                return self.fail(status).await;
            }
        };
        // The identity this credential proved is being served: only the
        // names change.
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.credential == credential)
        {
            self.pending = None;
            self.names = names;
            return self.send_current(true).await;
        }
        // Its fetch is already under way: it will serve these names.
        if let Some(p) = self
            .pending
            .as_mut()
            .filter(|p| *p.fetch.credential() == credential)
        {
            p.names = names;
            return Step::Continue;
        }
        match FirstFetch::admit(&self.conn, credential) {
            Ok(fetch) => {
                self.pending = Some(Pending { names, fetch });
                Step::Continue
            }
            Err(e) => self.refuse(&names, e).await,
        }
    }

    /// A fetch ended.
    async fn on_fetched(&mut self, result: Result<Subscription, SecretError>) -> Step {
        match result {
            Ok(sub) => {
                let p = self
                    .pending
                    .take()
                    .expect("a fetch ended, so one was pending");
                self.names = p.names;
                // A token file's new token for the identity being served
                // changes nothing the client sees: only what changed is sent.
                let same = self
                    .current
                    .as_ref()
                    .is_some_and(|c| c.sub.identity == sub.identity);
                self.current = Some(Current::new(p.fetch.into_credential(), sub));
                self.send_current(!same).await
            }
            Err(e) if e.is_transient() => {
                let p = self
                    .pending
                    .as_mut()
                    .expect("a fetch ended, so one was pending");
                let delay = p.fetch.retry_later();
                tracing::error!(
                    stream = self.id,
                    "Failed to sign cert for {:?}: {e}; retrying in {:.1}s",
                    p.names.to_string(),
                    delay.as_secs_f64()
                );
                Step::Continue
            }
            Err(e) => {
                let p = self
                    .pending
                    .take()
                    .expect("a fetch ended, so one was pending");
                self.refuse(&p.names, e).await
            }
        }
    }

    /// The identity's state changed: sent, unless the CA has meanwhile
    /// rejected the JWT this stream proved it with.
    async fn on_changed(&mut self) -> Step {
        if let Some(status) = self.current.as_ref().and_then(Current::rejection) {
            self.service.credential_ended(self.id, &status);
            return self.fail(status).await;
        }
        self.send_current(false).await
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
                let (names, fetching) = (&self.names, self.pending.is_some());
                if let Some(fetch) = refresh_fetch(
                    &self.conn,
                    &self.current,
                    &self.credential,
                    fetching,
                    self.id,
                ) {
                    self.pending = Some(Pending {
                        names: names.clone(),
                        fetch,
                    });
                }
                Step::Continue
            }
        }
    }

    /// Ends the stream for a secret failure, logged as such.
    async fn refuse(&mut self, names: &ResourceNames, e: SecretError) -> Step {
        let status = self.service.refusal(self.id, &names.to_string(), &e);
        self.fail(status).await
    }

    /// Sends the subscribed resources if any changed since last sent (or always).
    async fn send_current(&mut self, always: bool) -> Step {
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
        let roots = state.roots;
        let snap = resources::Snapshot {
            secret: &secret,
            roots: &roots,
        };
        let versions: HashMap<String, String> = self
            .names
            .as_slice()
            .iter()
            .map(|n| (n.clone(), resource_version(n, &snap)))
            .collect();
        if !always && versions == self.sent_versions {
            return Step::Continue;
        }
        self.nonce_counter += 1;
        let nonce = format!("{:x}-{}", self.id, self.nonce_counter);
        let resp = resources::response(&self.names, &snap, nonce.clone());
        tracing::info!(
            stream = self.id,
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
        if self.out.send(Box::new(Ok(resp))).await.is_err() {
            return Step::End;
        }
        Step::Continue
    }

    async fn fail(&mut self, status: Status) -> Step {
        let _ = self.out.send(Box::new(Err(status))).await;
        Step::End
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

/// Drives a pending subscription's fetch (see [`FirstFetch::result`]);
/// pending forever when there is none.
async fn progress(
    pending: &mut Option<Pending>,
    manager: &Arc<SecretManager>,
) -> Result<Subscription, SecretError> {
    match pending {
        Some(p) => p.fetch.result(manager).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;

//! The stream driver: the identity side of every stream, whatever its
//! protocol (`StreamSecrets`, `DeltaSecrets`, the Workload API's X.509
//! streams). A protocol keeps only its own bookkeeping (nonces, versions,
//! names, message shape); the [`Driver`] owns the rest:
//!
//! - the credential a stream proves its identity with, where it comes from
//!   ([`CredentialSource`]) and its checks;
//! - the fetch of the identity under the login budgets of the connection and
//!   its peer (its JWT known to the peer once the CA proved it), retried
//!   with back-off while the stream waits ([`fetch::FirstFetch`]);
//! - the subscription it is served from ([`credential::Current`]), and what
//!   happens to it: a change, the CA rejecting the stream's JWT at a renewal,
//!   the JWT expiring, a token file's new token;
//! - shutdown.
//!
//! A protocol's loop polls [`Driver::next`] beside its own requests; each
//! [`Event`] tells it to send what changed, or to end.

pub mod credential;
pub mod fetch;
pub mod run;

use std::fmt::Display;
use std::sync::Arc;

use tokio::sync::watch;
use tonic::Status;

use crate::clock::Clock;
use crate::endpoint::connection::Connection;
use crate::endpoint::credential::CredentialSource;
use crate::endpoint::limits::{more, Limits};
use crate::endpoint::unproven::Proof;
use crate::endpoint::Endpoint;
use crate::metrics::{self, Refusal};
use crate::secrets::{SecretError, SecretManager, Subscription, WorkloadSecret};
use crate::trust::RootBundle;
use credential::{
    expired_status, next_event, shutting_down, CredentialDue, Current, IdentityEvent,
};
use fetch::{refresh_fetch, FirstFetch};

/// How one protocol's streams are named in the log and treated.
#[derive(Debug)]
pub struct Surface {
    /// What the stream is called in the log: `SDS stream`.
    pub name: &'static str,
    /// What a refused credential's line starts with: `refusing SDS request`.
    pub refusing: &'static str,
    /// The throttle key of that line.
    pub credential_key: &'static str,
    /// How a refusal by the CA (or a bound) is described, for `what` (the
    /// resources asked for).
    pub failure: fn(&str, &SecretError) -> String,
    /// A transient CA failure is retried with back-off while the stream
    /// waits; otherwise it ends the stream.
    pub retry_transient: bool,
    /// The stream counts in `node_agent_sds_streams_open`.
    pub counted: bool,
    /// At shutdown the stream ends with `UNAVAILABLE`; otherwise quietly.
    pub unavailable_at_shutdown: bool,
}

impl Surface {
    /// A stream of one of the two xDS protocols: a transient CA failure
    /// waits with back-off, the stream counts in
    /// `node_agent_sds_streams_open`, and shutdown ends it quietly.
    pub const fn xds(
        name: &'static str,
        refusing: &'static str,
        credential_key: &'static str,
    ) -> Self {
        Self {
            name,
            refusing,
            credential_key,
            failure: failed_to_sign,
            retry_transient: true,
            counted: true,
            unavailable_at_shutdown: false,
        }
    }
}

/// The CA's refusal, as SDS has always logged it (and Istio 1.1 did).
pub fn failed_to_sign(what: &str, e: &SecretError) -> String {
    format!("Failed to sign cert for {what:?}: {e}")
}

/// The gRPC status a stream ends with for a secret failure.
pub fn status_for(e: &SecretError) -> Status {
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

/// What the driver asks of its protocol.
#[derive(Debug)]
pub enum Event {
    /// A fetch succeeded and the stream serves from it: send. `new_identity`
    /// when it is another identity than before (send everything).
    Fetched { new_identity: bool },
    /// The identity's secret or trust bundle changed: send what changed.
    Changed,
    /// The stream ends, with this status (already logged and counted), or
    /// quietly.
    End(Option<Status>),
}

/// The identity's secret and the trust bundle, as a stream serves them.
#[derive(Debug, Clone)]
pub struct Served {
    pub secret: Arc<WorkloadSecret>,
    pub roots: Arc<RootBundle>,
}

/// Whether what a stream asks for is served now or after a fetch.
#[derive(Debug, PartialEq, Eq)]
pub enum Want {
    /// The identity the credential proves is being served.
    Now,
    /// A fetch for it is under way; [`Event::Fetched`] follows.
    Waiting,
}

/// The identity side of one stream.
pub struct Driver {
    id: u64,
    surface: &'static Surface,
    manager: Arc<SecretManager>,
    limits: Arc<Limits>,
    conn: Arc<Connection>,
    source: CredentialSource,
    /// Whether the stream has proven a credential (see
    /// [`crate::endpoint::unproven`]).
    proof: Arc<Proof>,
    /// The identity being served, and the credential that proved it.
    current: Option<Current>,
    /// A fetch waiting for the CA.
    pending: Option<FirstFetch>,
    shutdown: watch::Receiver<bool>,
    /// The agent's clock, by which the JWT's `exp` is read.
    clock: Clock,
    _open: Option<metrics::StreamOpen>,
}

impl Driver {
    pub(crate) fn new(
        id: u64,
        surface: &'static Surface,
        manager: Arc<SecretManager>,
        endpoint: &Endpoint,
        conn: Arc<Connection>,
        source: CredentialSource,
        proof: Arc<Proof>,
    ) -> Self {
        Self {
            proof,
            id,
            surface,
            clock: manager.clock(),
            manager,
            limits: endpoint.limits.clone(),
            conn,
            source,
            current: None,
            pending: None,
            shutdown: endpoint.shutdown.clone(),
            _open: surface.counted.then(metrics::stream_opened),
        }
    }

    /// What the stream is called in the log.
    pub fn name(&self) -> &'static str {
        self.surface.name
    }

    /// The stream's id, for the log.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The stream's connection.
    pub fn conn(&self) -> &Arc<Connection> {
        &self.conn
    }

    /// The bounds, for a protocol's own refusals.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The identity being served, for the log.
    pub fn identity(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.sub.identity.as_str())
    }

    /// True while a fetch waits for the CA.
    pub fn waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// Stops serving: the subscription and any fetch are dropped.
    pub fn stop(&mut self) {
        self.current = None;
        self.pending = None;
    }

    /// Checks that the stream carries a credential that is well-formed
    /// and not expired, whatever its request asks: a stream's first request
    /// must, so that a stream that proves nothing ends at once instead of
    /// holding its place (`UNAUTHENTICATED`, logged and counted as a refusal).
    pub fn require_credential(&mut self, what: &(dyn Display + Sync)) -> Result<(), Status> {
        self.credential(what).map(|_| ())
    }

    /// The stream's credential, or the refusal, logged and counted.
    fn credential(
        &mut self,
        what: &(dyn Display + Sync),
    ) -> Result<crate::identity::Credential, Status> {
        self.source.get(&self.clock).inspect_err(|status| {
            metrics::refused(Refusal::Credential);
            if let Some(n) = self.limits.throttle(self.surface.credential_key) {
                tracing::warn!(
                    stream = self.id,
                    connection = self.conn.id,
                    resources = %what,
                    "{}: {}{}",
                    self.surface.refusing,
                    status.message(),
                    more(n)
                );
            }
        })
    }

    /// The stream asks for `what` to be served from the identity its
    /// credential proves: at once if that is the one being served, else
    /// after a fetch. `Err` when the credential or the connection's login
    /// budget refuses it (logged and counted); the stream ends with it.
    pub fn want(&mut self, what: &(dyn Display + Sync)) -> Result<Want, Status> {
        let credential = self.credential(what)?;
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.credential == credential)
        {
            self.pending = None;
            return Ok(Want::Now);
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| *p.credential() == credential)
        {
            return Ok(Want::Waiting);
        }
        match FirstFetch::admit(&self.conn, &self.manager, credential) {
            Ok(fetch) => {
                self.pending = Some(fetch);
                Ok(Want::Waiting)
            }
            Err(e) => Err(self.refusal(&what.to_string(), &e)),
        }
    }

    /// What the stream serves now: `Ok(None)` before the identity's first
    /// secret, `Err(UNAVAILABLE)` once the manager closed it.
    pub fn served(&mut self) -> Result<Option<Served>, Status> {
        let Some(current) = self.current.as_mut() else {
            return Ok(None);
        };
        let state = current.sub.secret.borrow_and_update().clone();
        if let Some(reason) = state.closed {
            return Err(Status::unavailable(reason));
        }
        Ok(state.secret.map(|secret| Served {
            secret,
            roots: state.roots,
        }))
    }

    /// Waits for what the protocol must do next; `what` names the resources
    /// served, for the log. Cancel-safe.
    pub async fn next(&mut self, what: &(dyn Display + Sync)) -> Event {
        loop {
            tokio::select! {
                event = next_event(&mut self.current, self.source.is_token_file()) => {
                    if let Some(event) = self.on_identity(event) {
                        return event;
                    }
                }
                result = progress(&mut self.pending, &self.manager) => {
                    if let Some(event) = self.on_fetched(result, what) {
                        return event;
                    }
                }
                _ = shutting_down(&mut self.shutdown) => {
                    return Event::End(self.surface.unavailable_at_shutdown.then(|| {
                        Status::unavailable("node-agent is shutting down")
                    }));
                }
            }
        }
    }

    fn on_identity(&mut self, event: IdentityEvent) -> Option<Event> {
        match event {
            IdentityEvent::Changed => {
                // Sent, unless the JWT this stream proved its identity with
                // has expired, or was not proven for the certificate now
                // served.
                if let Some(exp) = self.current.as_ref().and_then(|c| c.expired(&self.clock)) {
                    let status = expired_status(exp, &self.source);
                    self.limits.credential_ended(self.id, &status);
                    return Some(Event::End(Some(status)));
                }
                if let Some(status) = self.current.as_ref().and_then(Current::rejection) {
                    self.limits.credential_ended(self.id, &status);
                    return Some(Event::End(Some(status)));
                }
                Some(Event::Changed)
            }
            IdentityEvent::Dropped => Some(Event::End(None)),
            IdentityEvent::Credential(CredentialDue::Expired(exp)) => {
                let status = expired_status(exp, &self.source);
                self.limits.credential_ended(self.id, &status);
                Some(Event::End(Some(status)))
            }
            IdentityEvent::Credential(CredentialDue::Refresh) => {
                // A token file may hold a new token: it is proven, and served
                // from, while the old one still serves.
                if let Some(fetch) = refresh_fetch(
                    &self.conn,
                    &self.manager,
                    &self.current,
                    &self.source,
                    self.pending.is_some(),
                    self.id,
                    &self.clock,
                ) {
                    self.pending = Some(fetch);
                }
                None
            }
        }
    }

    fn on_fetched(
        &mut self,
        result: Result<Subscription, SecretError>,
        what: &(dyn Display + Sync),
    ) -> Option<Event> {
        match result {
            Ok(sub) => {
                let fetch = self
                    .pending
                    .take()
                    .expect("a fetch ended, so one was pending");
                // A token file's new token for the identity being served
                // changes nothing the client sees.
                let same = self
                    .current
                    .as_ref()
                    .is_some_and(|c| c.sub.identity == sub.identity);
                let (credential, admission) = fetch.into_parts();
                // The CA proved the JWT: known to the peer from now on.
                self.conn.proven(admission);
                self.current = Some(Current::new(credential, sub, &self.clock));
                // The CA accepted the stream's credential: neither the stream
                // nor its connection makes room for newcomers any more.
                self.proof.prove();
                self.conn.prove();
                Some(Event::Fetched {
                    new_identity: !same,
                })
            }
            Err(e) if e.is_transient() && self.surface.retry_transient => {
                let fetch = self
                    .pending
                    .as_mut()
                    .expect("a fetch ended, so one was pending");
                let delay = fetch.retry_later();
                tracing::error!(
                    stream = self.id,
                    "{}; retrying in {:.1}s",
                    (self.surface.failure)(&what.to_string(), &e),
                    delay.as_secs_f64()
                );
                None
            }
            Err(e) => {
                self.pending = None;
                Some(Event::End(Some(self.refusal(&what.to_string(), &e))))
            }
        }
    }

    /// Logs and counts a secret failure that ends the stream; the status to
    /// end it with.
    fn refusal(&self, what: &str, e: &SecretError) -> Status {
        let text = (self.surface.failure)(what, e);
        self.limits.log_refusal(self.id, &text, e);
        Status::new(status_for(e).code(), text)
    }
}

/// Drives a pending fetch (see [`FirstFetch::result`]); pending forever
/// when there is none.
async fn progress(
    pending: &mut Option<FirstFetch>,
    manager: &Arc<SecretManager>,
) -> Result<Subscription, SecretError> {
    match pending {
        Some(fetch) => Box::pin(fetch.result(manager)).await,
        None => std::future::pending().await,
    }
}

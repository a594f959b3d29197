//! One `DeltaSecrets` stream: Envoy's incremental (delta) xDS, served from
//! the same secret manager as `StreamSecrets`.
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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::resources::{self, encode, resource_version, Snapshot, SECRET_TYPE_URL, SERVED};
use super::{log_refusal, status_for, BoxStream, CredentialSource, SdsService};
use crate::backoff::Backoff;
use crate::secrets::{SecretError, SecretManager, Subscription};

pub(super) type Outbound = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// Most distinct names one request may subscribe to. SDS serves two; a few
/// more are tolerated (and answered as removed) before the request is refused.
pub const MAX_NAMES_PER_REQUEST: usize = 8;

/// Responses remembered for matching ACKs and NACKs; older nonces are
/// treated as unknown (ignored).
const NONCES_KEPT: usize = 8;

/// Back-off of a first fetch that failed for a transient reason.
const FIRST_FETCH_RETRY: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(10));

/// Opens a `DeltaSecrets` stream (called by [`SdsService`]).
pub(super) fn open(
    service: &SdsService,
    request: Request<Streaming<DeltaDiscoveryRequest>>,
) -> Result<Response<BoxStream<DeltaDiscoveryResponse>>, Status> {
    let id = service.next_stream.fetch_add(1, Ordering::Relaxed);
    let credential =
        CredentialSource::from_metadata(request.metadata(), service.token_path.as_deref());
    tracing::debug!(stream = id, "SDS delta stream opened");
    let (tx, rx) = mpsc::channel(4);
    let stream = DeltaStream::new(
        id,
        service.manager.clone(),
        credential,
        tx,
        service.shutdown.clone(),
    );
    tokio::spawn(stream.run(request.into_inner()));
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// A random tag of this agent process, in every nonce, so that a nonce from
/// a previous agent never matches one of this agent's responses.
fn process_tag() -> u32 {
    static TAG: OnceLock<u32> = OnceLock::new();
    *TAG.get_or_init(rand::random)
}

type FetchFuture = Pin<Box<dyn Future<Output = Result<Subscription, SecretError>> + Send>>;

/// Where the stream's first fetch stands.
enum Fetch {
    /// Not needed (subscribed) or not started.
    Idle,
    /// Waiting for the secret manager.
    Running(FetchFuture),
    /// Failed for a transient reason; tried again at the instant.
    Waiting(tokio::time::Instant),
}

enum FetchEvent {
    Done(Result<Subscription, SecretError>),
    RetryDue,
}

enum Step {
    Continue,
    End,
}

/// State of one delta stream.
pub(super) struct DeltaStream {
    id: u64,
    manager: Arc<SecretManager>,
    credential: CredentialSource,
    out: Outbound,
    shutdown: watch::Receiver<bool>,
    /// Served names the client is subscribed to, in `SERVED` order.
    subscribed: Vec<&'static str>,
    /// The version last sent for each subscribed name; a name without one is
    /// sent with the next response.
    sent: HashMap<&'static str, String>,
    /// Recent responses: nonce and the (name, version) pairs they carried.
    unacked: VecDeque<(String, Vec<(&'static str, String)>)>,
    nonce_counter: u64,
    sub: Option<Subscription>,
    fetch: Fetch,
    backoff: Backoff,
}

impl DeltaStream {
    fn new(
        id: u64,
        manager: Arc<SecretManager>,
        credential: CredentialSource,
        out: Outbound,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            id,
            manager,
            credential,
            out,
            shutdown,
            subscribed: Vec::new(),
            sent: HashMap::new(),
            unacked: VecDeque::new(),
            nonce_counter: 0,
            sub: None,
            fetch: Fetch::Idle,
            backoff: Backoff::new(FIRST_FETCH_RETRY.0, FIRST_FETCH_RETRY.1),
        }
    }

    /// Serves the stream until Envoy closes it, it fails, or shutdown.
    /// Requests keep being read while the first fetch waits on the CA.
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>) {
        loop {
            let step = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) => {
                        tracing::debug!(stream = self.id, "SDS delta stream closed by the client");
                        Step::End
                    }
                    Err(status) => {
                        tracing::debug!(stream = self.id, error = %status, "SDS delta stream ended with an error");
                        Step::End
                    }
                },
                event = fetch_event(&mut self.fetch) => match event {
                    FetchEvent::Done(result) => self.on_fetched(result).await,
                    FetchEvent::RetryDue => self.start_fetch().await,
                },
                changed = wait_changed(&mut self.sub) => {
                    if changed { self.send_changed().await } else { Step::End }
                }
                _ = shutting_down(&mut self.shutdown) => Step::End,
            };
            if let Step::End = step {
                break;
            }
        }
        tracing::debug!(
            stream = self.id,
            identity = ?self.sub.as_ref().map(|s| s.identity.as_str()),
            "SDS delta stream done"
        );
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Step {
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            return self
                .fail(Status::invalid_argument(format!(
                    "unsupported type_url {:?}; this service serves {SECRET_TYPE_URL}",
                    req.type_url
                )))
                .await;
        }
        if !req.response_nonce.is_empty() {
            self.on_ack(&req);
        }
        for name in &req.resource_names_unsubscribe {
            if let Some(i) = self.subscribed.iter().position(|n| n == name) {
                let name = self.subscribed.remove(i);
                self.sent.remove(name);
                tracing::debug!(stream = self.id, resource = name, "SDS delta: unsubscribed");
            }
        }
        let mut wanted: Vec<&str> = Vec::new();
        for name in &req.resource_names_subscribe {
            if !wanted.contains(&name.as_str()) {
                wanted.push(name);
            }
        }
        if wanted.len() > MAX_NAMES_PER_REQUEST {
            let msg = format!(
                "the request subscribes to {} distinct resources; at most {MAX_NAMES_PER_REQUEST} are accepted \
                 and this agent serves {}",
                wanted.len(),
                SERVED.join(", ")
            );
            tracing::warn!(stream = self.id, "refusing SDS delta request: {msg}");
            return self.fail(Status::invalid_argument(msg)).await;
        }
        if !req.initial_resource_versions.is_empty() {
            tracing::debug!(
                stream = self.id,
                versions = ?req.initial_resource_versions,
                "SDS delta: the client reports versions it holds; every subscribed resource is sent anyway"
            );
        }
        let mut unknown = Vec::new();
        for name in wanted {
            match SERVED.iter().find(|s| **s == name) {
                Some(served) => {
                    if !self.subscribed.contains(served) {
                        self.subscribed.push(served);
                        self.subscribed
                            .sort_by_key(|n| SERVED.iter().position(|s| s == n));
                    }
                    // Always answered, whatever the client claims to hold.
                    self.sent.remove(served);
                }
                // The wildcard means "everything"; SDS clients name their secrets.
                None if name == "*" => {
                    tracing::debug!(stream = self.id, "SDS delta: wildcard subscription ignored")
                }
                None => unknown.push(name.to_string()),
            }
        }
        if !unknown.is_empty() {
            tracing::warn!(
                stream = self.id,
                resources = ?unknown,
                "SDS delta: subscription to unknown secret(s), answered as removed; this agent serves {}",
                SERVED.join(", ")
            );
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
        }
        if self.subscribed.is_empty() {
            // Nothing left to serve: stop watching the identity.
            self.sub = None;
            self.fetch = Fetch::Idle;
            return Step::Continue;
        }
        if self.sub.is_some() {
            self.send_changed().await
        } else if matches!(self.fetch, Fetch::Idle) {
            self.start_fetch().await
        } else {
            // A fetch is under way; its result is sent when it arrives.
            Step::Continue
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
                nonce = %req.response_nonce,
                "SDS delta: ignoring a nonce this stream did not send or no longer tracks"
            );
            return;
        };
        let (_, carried) = self.unacked.remove(pos).expect("position is in range");
        match &req.error_detail {
            Some(err) => tracing::warn!(
                stream = self.id,
                identity = ?self.sub.as_ref().map(|s| s.identity.as_str()),
                resources = ?carried,
                code = err.code,
                "Envoy rejected the SDS delta response (NACK): {}; the same version will not be sent again, the next change will be",
                err.message
            ),
            None => tracing::debug!(stream = self.id, resources = ?carried, "SDS delta ACK"),
        }
    }

    async fn start_fetch(&mut self) -> Step {
        let credential = match self.credential.get() {
            Ok(c) => c,
            Err(status) => {
                tracing::warn!(stream = self.id, resources = ?self.subscribed, "refusing SDS delta request: {}", status.message());
                return self.fail(status).await;
            }
        };
        let manager = self.manager.clone();
        self.fetch = Fetch::Running(Box::pin(
            async move { manager.subscribe(&credential).await },
        ));
        Step::Continue
    }

    async fn on_fetched(&mut self, result: Result<Subscription, SecretError>) -> Step {
        match result {
            Ok(sub) => {
                self.fetch = Fetch::Idle;
                self.backoff.reset();
                self.sub = Some(sub);
                self.send_changed().await
            }
            Err(e) => {
                let what = format!(
                    "Failed to sign cert for {:?}: {e}",
                    self.subscribed.join(",")
                );
                if e.is_transient() {
                    let delay = self.backoff.next_delay();
                    self.fetch = Fetch::Waiting(tokio::time::Instant::now() + delay);
                    tracing::error!(
                        stream = self.id,
                        "{what}; retrying in {:.1}s",
                        delay.as_secs_f64()
                    );
                    Step::Continue
                } else {
                    self.fetch = Fetch::Idle;
                    log_refusal(self.id, &what, &e);
                    let status = status_for(&e);
                    self.fail(Status::new(status.code(), what)).await
                }
            }
        }
    }

    /// Sends every subscribed resource whose version differs from the one
    /// last sent (or that was never sent), one resource per name.
    async fn send_changed(&mut self) -> Step {
        let Some(sub) = self.sub.as_ref() else {
            return Step::Continue;
        };
        let state = sub.secret.borrow().clone();
        if let Some(reason) = state.closed {
            return self.fail(Status::unavailable(reason)).await;
        }
        let Some(secret) = state.secret else {
            return Step::Continue;
        };
        let roots = sub.roots.borrow().clone();
        let snap = Snapshot {
            secret: &secret,
            roots: &roots,
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

/// The next event of the first fetch; pending forever when there is none.
async fn fetch_event(fetch: &mut Fetch) -> FetchEvent {
    match fetch {
        Fetch::Idle => std::future::pending().await,
        Fetch::Running(f) => FetchEvent::Done(f.as_mut().await),
        Fetch::Waiting(at) => {
            tokio::time::sleep_until(*at).await;
            FetchEvent::RetryDue
        }
    }
}

/// Waits for the identity's secret or the trust bundle to change; pending
/// forever without a subscription. Returns false when the manager dropped it.
async fn wait_changed(sub: &mut Option<Subscription>) -> bool {
    match sub {
        Some(sub) => tokio::select! {
            r = sub.secret.changed() => r.is_ok(),
            r = sub.roots.changed() => r.is_ok(),
        },
        None => std::future::pending().await,
    }
}

/// Resolves once the agent is shutting down.
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

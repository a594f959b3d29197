//! One `StreamSecrets` stream: the xDS state-of-the-world state machine.
//!
//! - Each response carries a version and a fresh nonce.
//! - A request echoing the last nonce without `error_detail` is an ACK: no reply.
//! - A NACK (`error_detail` set) is logged and not answered with the same
//!   secret again; only a changed secret is sent afterwards.
//! - A request whose nonce is not the last one sent is stale and ignored.
//! - When the identity's secret changes, the new one is pushed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::resources::{self, check_names, resource_version};
use super::{log_refusal, status_for, CredentialSource};
use crate::backoff::Backoff;
use crate::identity::SpiffeId;
use crate::secrets::{SecretManager, Subscription};

pub(super) type Outbound = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// State of one stream.
pub(super) struct SdsStream {
    pub id: u64,
    pub manager: Arc<SecretManager>,
    pub credential: CredentialSource,
    pub out: Outbound,
    names: Vec<String>,
    last_nonce: Option<String>,
    sent_versions: HashMap<String, String>,
    nonce_counter: u64,
    identity: Option<SpiffeId>,
    watch: Option<Subscription>,
    /// A subscription waiting for the CA to come back.
    pending: Option<Pending>,
    /// Turns true when the agent shuts down.
    shutdown: watch::Receiver<bool>,
}

/// First fetch of a subscription that failed for a transient reason: retried
/// with back-off while the stream stays open, so the workload is served as
/// soon as the CA answers.
struct Pending {
    names: Vec<String>,
    backoff: Backoff,
    retry_at: tokio::time::Instant,
}

/// Back-off of a waiting first fetch: from 500 ms, capped at 10 s.
const FIRST_FETCH_RETRY: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(10));

enum Step {
    Continue,
    End,
}

impl SdsStream {
    pub fn new(
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
            names: Vec::new(),
            last_nonce: None,
            sent_versions: HashMap::new(),
            nonce_counter: 0,
            identity: None,
            watch: None,
            pending: None,
            shutdown,
        }
    }

    /// Serves the stream until Envoy closes it, it fails, or shutdown.
    pub async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>) {
        loop {
            let step = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) => {
                        tracing::debug!(stream = self.id, "SDS stream closed by the client");
                        Step::End
                    }
                    Err(status) => {
                        tracing::debug!(stream = self.id, error = %status, "SDS stream ended with an error");
                        Step::End
                    }
                },
                changed = wait_changed(&mut self.watch) => {
                    if changed { self.push().await } else { Step::End }
                }
                _ = wait_retry(&self.pending) => self.attempt().await,
                _ = shutting_down(&mut self.shutdown) => Step::End,
            };
            if let Step::End = step {
                break;
            }
        }
        tracing::debug!(stream = self.id, identity = ?self.identity.as_ref().map(|i| i.as_str()), "SDS stream done");
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Step {
        if !req.type_url.is_empty() && req.type_url != resources::SECRET_TYPE_URL {
            return self
                .fail(Status::invalid_argument(format!(
                    "unsupported type_url {:?}; this service serves {}",
                    req.type_url,
                    resources::SECRET_TYPE_URL
                )))
                .await;
        }
        if !req.response_nonce.is_empty() {
            if self.last_nonce.as_deref() != Some(req.response_nonce.as_str()) {
                tracing::debug!(stream = self.id, nonce = %req.response_nonce, "ignoring SDS request with a stale nonce");
                return Step::Continue;
            }
            if let Some(err) = &req.error_detail {
                tracing::warn!(
                    stream = self.id,
                    identity = ?self.identity.as_ref().map(|i| i.as_str()),
                    resources = ?req.resource_names,
                    version = %req.version_info,
                    code = err.code,
                    "Envoy rejected the SDS response (NACK): {}; the same secret will not be sent again, the next change will be",
                    err.message
                );
                return Step::Continue;
            }
            if req.resource_names == self.names {
                tracing::debug!(stream = self.id, version = %req.version_info, "SDS ACK");
                return Step::Continue;
            }
        }
        // A first request, or one that changes the subscription.
        if let Err(msg) = check_names(&req.resource_names) {
            tracing::warn!(stream = self.id, resources = ?req.resource_names, "refusing SDS request: {msg}");
            return self.fail(Status::invalid_argument(msg)).await;
        }
        self.pending = Some(Pending {
            names: req.resource_names,
            backoff: Backoff::new(FIRST_FETCH_RETRY.0, FIRST_FETCH_RETRY.1),
            retry_at: tokio::time::Instant::now(),
        });
        self.attempt().await
    }

    /// Tries to serve the pending subscription.
    async fn attempt(&mut self) -> Step {
        let Some(pending) = self.pending.as_mut() else {
            return Step::Continue;
        };
        let names = pending.names.clone();
        let credential = match self.credential.get() {
            Ok(c) => c,
            Err(status) => {
                tracing::warn!(stream = self.id, resources = ?names, "refusing SDS request: {}", status.message());
                return self.fail(status).await;
            }
        };
        // A CA that hangs must not hold up shutdown.
        let manager = self.manager.clone();
        let result = tokio::select! {
            r = manager.subscribe(&credential) => r,
            _ = shutting_down(&mut self.shutdown) => return Step::End,
        };
        match result {
            Ok(sub) => {
                self.pending = None;
                self.names = names;
                self.identity = Some(sub.identity.clone());
                self.watch = Some(sub);
                self.send_current(true).await
            }
            Err(e) => {
                let what = format!("Failed to sign cert for {:?}: {e}", names.join(","));
                if e.is_transient() {
                    let pending = self.pending.as_mut().expect("pending is set");
                    let delay = pending.backoff.next_delay();
                    pending.retry_at = tokio::time::Instant::now() + delay;
                    tracing::error!(
                        stream = self.id,
                        "{what}; retrying in {:.1}s",
                        delay.as_secs_f64()
                    );
                    Step::Continue
                } else {
                    log_refusal(self.id, &what, &e);
                    let status = status_for(&e);
                    self.fail(Status::new(status.code(), what)).await
                }
            }
        }
    }

    /// Sends the subscribed resources if any changed since last sent (or always).
    async fn send_current(&mut self, always: bool) -> Step {
        let Some(sub) = self.watch.as_ref() else {
            return Step::Continue;
        };
        let state = sub.secret.borrow().clone();
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
            resources = ?self.names,
            version = %resp.version_info,
            "SDS: push"
        );
        self.last_nonce = Some(nonce);
        self.sent_versions = versions;
        if self.out.send(Ok(resp)).await.is_err() {
            return Step::End;
        }
        Step::Continue
    }

    async fn push(&mut self) -> Step {
        self.send_current(false).await
    }

    async fn fail(&mut self, status: Status) -> Step {
        let _ = self.out.send(Err(status)).await;
        Step::End
    }
}

/// Waits for the identity's state (secret and trust bundle) to change;
/// pending forever without a subscription. Returns false when the manager
/// dropped it.
async fn wait_changed(watch: &mut Option<Subscription>) -> bool {
    match watch {
        Some(sub) => sub.secret.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Resolves when a pending first fetch is due; pending forever otherwise.
async fn wait_retry(pending: &Option<Pending>) {
    match pending {
        Some(p) => tokio::time::sleep_until(p.retry_at).await,
        None => std::future::pending().await,
    }
}

/// Resolves once the agent is shutting down.
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

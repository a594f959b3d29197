//! What a stream of either xDS protocol (`StreamSecrets`, `DeltaSecrets`)
//! holds of the identity it serves: the subscription it is served from
//! ([`Current`]) and the fetch of a new one ([`FirstFetch`]), which holds
//! its place among the connection's logins in flight until it ends.
//!
//! A stream keeps reading requests while a fetch waits on the CA: the fetch
//! is a future the stream's loop polls beside its requests
//! ([`FirstFetch::result`] is cancel-safe), so an ACK, a changed
//! subscription or the client leaving are handled at once, and leaving
//! cancels the fetch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::connection::{Admission, Connection};
use crate::backoff::Backoff;
use crate::identity::Credential;
use crate::metrics::{self, Retry};
use crate::secrets::{SecretError, SecretManager, Subscription};

/// Back-off of a waiting first fetch: from 500 ms, capped at 10 s.
const FIRST_FETCH_RETRY: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(10));

/// The identity being served, and the credential that proved it. The
/// subscription is held as long as the stream serves from it: it keeps the
/// stream's JWT among those the identity is renewed with.
pub(super) struct Current {
    pub credential: Credential,
    pub sub: Subscription,
}

/// A subscription not served yet: its fetch is running, or waiting to be
/// retried after a transient failure (with back-off, while the stream stays
/// open, so the workload is served as soon as the CA answers).
pub(super) struct FirstFetch {
    credential: Credential,
    backoff: Backoff,
    /// Held until the fetch has ended: its place among the connection's
    /// logins in flight.
    _admission: Admission,
    attempt: Attempt,
}

type Fetch = Pin<Box<dyn Future<Output = Result<Subscription, SecretError>> + Send>>;

enum Attempt {
    Due(tokio::time::Instant),
    Running(Fetch),
}

impl FirstFetch {
    /// A fetch for `credential`, if `conn`'s login budget lets it reach the
    /// CA (`SDS_CONNECTION_*`); else the bound it would pass, and nothing is
    /// asked of the CA.
    pub fn admit(conn: &Connection, credential: Credential) -> Result<Self, SecretError> {
        let admission = conn.admit(&credential)?;
        Ok(Self {
            credential,
            backoff: Backoff::new(FIRST_FETCH_RETRY.0, FIRST_FETCH_RETRY.1),
            _admission: admission,
            attempt: Attempt::Due(tokio::time::Instant::now()),
        })
    }

    /// The credential this fetch proves.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The credential, once the fetch has succeeded (and its place among
    /// the logins in flight is given back).
    pub fn into_credential(self) -> Credential {
        self.credential
    }

    /// Waits until the attempt is due, starts the fetch, and returns its
    /// result. Cancel-safe: the running fetch lives in `self`, not in this
    /// future.
    pub async fn result(
        &mut self,
        manager: &Arc<SecretManager>,
    ) -> Result<Subscription, SecretError> {
        loop {
            match &mut self.attempt {
                Attempt::Due(at) => {
                    tokio::time::sleep_until(*at).await;
                    let manager = manager.clone();
                    let credential = self.credential.clone();
                    self.attempt =
                        Attempt::Running(Box::pin(
                            async move { manager.subscribe(&credential).await },
                        ));
                }
                Attempt::Running(fetch) => return fetch.await,
            }
        }
    }

    /// After a transient failure: the next attempt is due after the returned
    /// back-off.
    pub fn retry_later(&mut self) -> Duration {
        let delay = self.backoff.next_delay();
        self.attempt = Attempt::Due(tokio::time::Instant::now() + delay);
        metrics::retry(Retry::FirstFetch);
        delay
    }
}

/// Waits for the identity's state (secret and trust bundle) to change;
/// pending forever without a subscription. Returns false when the manager
/// dropped it.
pub(super) async fn wait_changed(current: &mut Option<Current>) -> bool {
    match current {
        Some(c) => c.sub.secret.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Resolves once the agent is shutting down.
pub(crate) async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

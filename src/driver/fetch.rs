//! The fetch of a stream's identity: its first, or one proving a token
//! file's new token. It holds its places among the logins in flight of
//! its connection and peer until it ends, and waits with back-off after a
//! transient failure; on success its JWT becomes known to the peer.
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

use super::credential::{token_file_update, Current};
use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::endpoint::connection::{Admission, Connection};
use crate::endpoint::credential::CredentialSource;
use crate::endpoint::logins::Identity;
use crate::identity::Credential;
use crate::metrics::{self, Retry};
use crate::secrets::{SecretError, SecretManager, Subscription};

/// Back-off of a waiting first fetch: from 500 ms, capped at 10 s.
const FIRST_FETCH_RETRY: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(10));

/// A subscription not served yet: its fetch is running, or waiting to be
/// retried after a transient failure (with back-off, while the stream stays
/// open, so the workload is served as soon as the CA answers).
pub(crate) struct FirstFetch {
    credential: Credential,
    backoff: Backoff,
    /// Held until the fetch has ended: its place among the connection's
    /// logins in flight.
    admission: Admission,
    attempt: Attempt,
}

type Fetch = Pin<Box<dyn Future<Output = Result<Subscription, SecretError>> + Send>>;

enum Attempt {
    /// The fetch starts at once (`None`), or when its back-off ends.
    Due(Option<tokio::time::Instant>),
    Running(Fetch),
}

impl FirstFetch {
    /// A fetch for `credential`, if the login budgets of `conn` and its peer
    /// let it reach the CA (`SDS_CONNECTION_*`, `SDS_PEER_*`); else the bound
    /// it would pass, and nothing is asked of the CA.
    pub fn admit(
        conn: &Connection,
        manager: &SecretManager,
        credential: Credential,
    ) -> Result<Self, SecretError> {
        let admission = conn.admit(&credential, identity_state(manager, &credential))?;
        Ok(Self {
            credential,
            backoff: Backoff::new(FIRST_FETCH_RETRY.0, FIRST_FETCH_RETRY.1),
            admission,
            attempt: Attempt::Due(None),
        })
    }

    /// The credential this fetch proves.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The credential and its admission, once the fetch has succeeded (to
    /// be handed to [`Connection::proven`]).
    pub fn into_parts(self) -> (Credential, Admission) {
        (self.credential, self.admission)
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
                    // No timer for a fetch due at once: tokio rounds a
                    // deadline up to its next millisecond tick, so even a
                    // deadline of now waited up to a millisecond.
                    if let Some(at) = *at {
                        tokio::time::sleep_until(at).await;
                    }
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
        self.attempt = Attempt::Due(Some(tokio::time::Instant::now() + delay));
        metrics::retry(Retry::FirstFetch);
        delay
    }
}

/// On [`CredentialDue::Refresh`]: a fetch proving the token file's new
/// token, when it holds one and no fetch is under way (`fetching`); it runs
/// under the login budgets of the connection and its peer while the old
/// token still serves.
pub(crate) fn refresh_fetch(
    conn: &Connection,
    manager: &SecretManager,
    current: &Option<Current>,
    source: &CredentialSource,
    fetching: bool,
    stream: u64,
    clock: &Clock,
) -> Option<FirstFetch> {
    if fetching {
        return None;
    }
    let credential = token_file_update(current, source, clock)?;
    match FirstFetch::admit(conn, manager, credential) {
        Ok(fetch) => {
            tracing::debug!(stream, "proving the new token of WORKLOAD_TOKEN_PATH");
            Some(fetch)
        }
        Err(e) => {
            tracing::debug!(stream, "the new token of WORKLOAD_TOKEN_PATH waits: {e}");
            None
        }
    }
}

/// Whether the identity `credential` names is cached; one it cannot name
/// (its fetch fails before the CA) counts as cached.
pub(crate) fn identity_state(manager: &SecretManager, credential: &Credential) -> Identity {
    match manager.identity_of(credential) {
        Ok(id) if !manager.is_cached(&id) => Identity::New(id.0),
        _ => Identity::Cached,
    }
}

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
use tonic::Status;

use super::connection::{Admission, Connection};
use super::credential::CredentialSource;
use crate::backoff::Backoff;
use crate::identity::{unix_now, Claims, Credential};
use crate::metrics::{self, Retry};
use crate::secrets::{SecretError, SecretManager, Subscription};

/// Back-off of a waiting first fetch: from 500 ms, capped at 10 s.
const FIRST_FETCH_RETRY: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(10));

/// How long before its JWT expires a stream that reads `WORKLOAD_TOKEN_PATH`
/// reads it again: this, or a tenth of the token's life (`exp - iat`) if
/// shorter. kubelet replaces a projected token once 80% of its life (at
/// least 10 minutes) has passed, so by then the file holds a new one.
pub const TOKEN_FILE_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// How often the file is read again while it still holds the old token.
const TOKEN_FILE_RECHECK: Duration = Duration::from_secs(5);

/// The identity being served, and the credential that proved it. The
/// subscription is held as long as the stream serves from it: it keeps the
/// stream's JWT among those the identity is renewed with.
///
/// A stream is served no longer than its credential holds: it ends when its
/// JWT expires ([`credential_due`]), or when the CA rejects that JWT at a
/// renewal ([`Current::rejection`]), so that a JWT once valid (a deleted
/// pod's, a stolen one) cannot keep receiving the certificates that other
/// streams' JWTs renew. A stream reading `WORKLOAD_TOKEN_PATH` instead
/// moves to the file's new token before the old one expires.
pub(crate) struct Current {
    pub credential: Credential,
    pub sub: Subscription,
    /// When the JWT expires (`exp`), as Unix time and as a timer deadline.
    expires: Option<(i64, tokio::time::Instant)>,
    /// When a token file is next read for a new token.
    next_refresh: Option<tokio::time::Instant>,
}

/// What a stream's credential asks of it.
#[derive(Debug)]
pub(crate) enum CredentialDue {
    /// Read the token file again: kubelet may have replaced the token.
    Refresh,
    /// The JWT expired at this Unix time: the stream ends.
    Expired(i64),
}

impl Current {
    pub fn new(credential: Credential, sub: Subscription) -> Self {
        let claims = credential.claims().ok();
        let now = tokio::time::Instant::now();
        let expires = claims.as_ref().and_then(|c| c.expires_at).map(|exp| {
            let left = u64::try_from(exp.saturating_sub(unix_now())).unwrap_or(0);
            (exp, now + Duration::from_secs(left))
        });
        let margin = refresh_margin(claims.as_ref());
        let next_refresh = expires.map(|(_, at)| at.checked_sub(margin).unwrap_or(at).max(now));
        Self {
            credential,
            sub,
            expires,
            next_refresh,
        }
    }

    /// `PERMISSION_DENIED` once the CA has rejected this stream's JWT at a
    /// renewal of its identity.
    pub fn rejection(&self) -> Option<Status> {
        self.sub.credential_rejected().then(|| {
            Status::permission_denied(format!(
                "the CA no longer accepts the JWT this stream was opened with (it was refused at a \
                 renewal of {}): open a new stream with the workload's current token",
                self.sub.identity
            ))
        })
    }
}

/// How long before a JWT's `exp` a token file is read again:
/// [`TOKEN_FILE_REFRESH_MARGIN`], or a tenth of the token's life if shorter.
fn refresh_margin(claims: Option<&Claims>) -> Duration {
    claims
        .and_then(|c| Some(c.expires_at? - c.issued_at?))
        .and_then(|life| u64::try_from(life).ok())
        .map(|life| Duration::from_millis(life.saturating_mul(100)))
        .map_or(TOKEN_FILE_REFRESH_MARGIN, |tenth| {
            tenth.min(TOKEN_FILE_REFRESH_MARGIN)
        })
}

/// What happened to the identity a stream serves.
#[derive(Debug)]
pub(crate) enum Event {
    /// Its state (secret or trust bundle) changed.
    Changed,
    /// The manager dropped it.
    Dropped,
    /// Its credential asks something of the stream.
    Credential(CredentialDue),
}

/// Waits for the next [`Event`] of the identity being served; pending
/// forever without one. Cancel-safe.
pub(crate) async fn next_event(current: &mut Option<Current>, token_file: bool) -> Event {
    let Some(c) = current.as_mut() else {
        return std::future::pending().await;
    };
    tokio::select! {
        r = c.sub.secret.changed() => if r.is_ok() { Event::Changed } else { Event::Dropped },
        due = credential_due(c.expires, &mut c.next_refresh, token_file) => Event::Credential(due),
    }
}

/// Waits until a credential expiring at `expires` asks something of the
/// stream: with `token_file`, [`CredentialDue::Refresh`]
/// [`TOKEN_FILE_REFRESH_MARGIN`] before the JWT expires and every few
/// seconds after; [`CredentialDue::Expired`] when it expires. Pending
/// forever for a JWT without `exp`. Cancel-safe.
async fn credential_due(
    expires: Option<(i64, tokio::time::Instant)>,
    next_refresh: &mut Option<tokio::time::Instant>,
    token_file: bool,
) -> CredentialDue {
    let Some((exp, deadline)) = expires else {
        return std::future::pending().await;
    };
    if token_file {
        if let Some(at) = next_refresh.filter(|at| *at < deadline) {
            tokio::time::sleep_until(at).await;
            *next_refresh = Some((at + TOKEN_FILE_RECHECK).min(deadline));
            return CredentialDue::Refresh;
        }
    }
    tokio::time::sleep_until(deadline).await;
    CredentialDue::Expired(exp)
}

/// On [`CredentialDue::Refresh`]: the token file's credential, when it is a
/// valid one other than the one being served.
pub(crate) fn token_file_update(
    current: &Option<Current>,
    source: &CredentialSource,
) -> Option<Credential> {
    let current = current.as_ref()?;
    let new = source.get().ok()?;
    (new != current.credential).then_some(new)
}

/// On [`CredentialDue::Refresh`]: a fetch proving the token file's new
/// token, when it holds one and no fetch is under way (`fetching`); it runs
/// under the connection's login budget while the old token still serves.
pub(super) fn refresh_fetch(
    conn: &Connection,
    current: &Option<Current>,
    source: &CredentialSource,
    fetching: bool,
    stream: u64,
) -> Option<FirstFetch> {
    if fetching {
        return None;
    }
    let credential = token_file_update(current, source)?;
    match FirstFetch::admit(conn, credential) {
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

/// The status a stream ends with when its JWT expired at `exp`.
pub(crate) fn expired_status(exp: i64, source: &CredentialSource) -> Status {
    match source {
        CredentialSource::TokenFile(path) => Status::unauthenticated(format!(
            "the JWT at WORKLOAD_TOKEN_PATH {} expired at {exp} (Unix time) and was not replaced; \
             check the pod's projected service-account token volume",
            path.display()
        )),
        _ => Status::unauthenticated(format!(
            "the JWT this stream was opened with expired at {exp} (Unix time): open a new stream \
             with the workload's current token"
        )),
    }
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

/// Resolves once the agent is shutting down.
pub(crate) async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ServiceAccount;
    use tokio::time::Instant;

    fn claims(iat: Option<i64>, exp: Option<i64>) -> Claims {
        Claims {
            service_account: ServiceAccount {
                namespace: "n".into(),
                name: "s".into(),
            },
            expires_at: exp,
            issued_at: iat,
        }
    }

    #[test]
    fn a_token_file_is_read_again_a_tenth_of_its_life_before_exp_at_most_a_minute() {
        let m = |iat, exp| refresh_margin(Some(&claims(iat, exp)));
        assert_eq!(m(Some(0), Some(3600)), TOKEN_FILE_REFRESH_MARGIN);
        assert_eq!(m(Some(100), Some(110)), Duration::from_secs(1));
        assert_eq!(m(None, Some(110)), TOKEN_FILE_REFRESH_MARGIN, "no iat");
        assert_eq!(
            m(Some(200), Some(100)),
            TOKEN_FILE_REFRESH_MARGIN,
            "iat after exp"
        );
        assert_eq!(refresh_margin(None), TOKEN_FILE_REFRESH_MARGIN);
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_jwt_ends_the_stream_at_its_exp_and_never_asks_for_a_refresh() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(10);
        let mut refresh = Some(start + Duration::from_secs(9));
        let due = credential_due(Some((42, deadline)), &mut refresh, false).await;
        assert!(matches!(due, CredentialDue::Expired(42)), "{due:?}");
        assert_eq!(Instant::now(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_file_is_read_again_before_exp_then_every_few_seconds_until_it_expires() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(100);
        let mut refresh = Some(start + Duration::from_secs(90));
        let mut seen = Vec::new();
        loop {
            let due = credential_due(Some((7, deadline)), &mut refresh, true).await;
            seen.push((
                (Instant::now() - start).as_secs(),
                matches!(due, CredentialDue::Refresh),
            ));
            if let CredentialDue::Expired(exp) = due {
                assert_eq!(exp, 7);
                break;
            }
        }
        assert_eq!(seen, [(90, true), (95, true), (100, false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_jwt_without_exp_asks_nothing() {
        let mut refresh = None;
        let never = credential_due(None, &mut refresh, true);
        let r = tokio::time::timeout(Duration::from_secs(365 * 86400), never).await;
        assert!(r.is_err(), "nothing is due for a JWT without exp");
        // Positive control: one with exp is due within the same wait.
        let soon = Instant::now() + Duration::from_secs(1);
        let r = tokio::time::timeout(
            Duration::from_secs(365 * 86400),
            credential_due(Some((1, soon)), &mut refresh, true),
        )
        .await;
        assert!(matches!(r, Ok(CredentialDue::Expired(1))));
    }
}

//! What a stream holds of the identity it serves ([`Current`]: the
//! subscription and the credential that proved it), and what that credential
//! asks of the stream over time: to read a token file again before the JWT
//! expires, or to end when it has expired ([`CredentialDue`]).

use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;

use crate::clock::Clock;
use crate::endpoint::credential::CredentialSource;
use crate::identity::{Claims, Credential};
use crate::secrets::{Standing, Subscription};

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
    /// The stream serves `sub`, proven by `credential`; its JWT's `exp` is
    /// read by `clock`.
    pub fn new(credential: Credential, sub: Subscription, clock: &Clock) -> Self {
        let claims = credential.claims().ok();
        let now = tokio::time::Instant::now();
        // The instant the wall clock reads `exp`, to the nanosecond: never
        // before it, so that a stream is not ended while its JWT is valid.
        let expires = claims.as_ref().and_then(|c| c.expires_at).map(|exp| {
            let at = std::time::SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(exp).unwrap_or(0));
            (exp, clock.instant(at).max(now))
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

    /// When its JWT expired (`exp`), if it has by `clock`.
    pub fn expired(&self, clock: &Clock) -> Option<i64> {
        self.expires
            .map(|(exp, _)| exp)
            .filter(|exp| *exp <= clock.unix_now())
    }

    /// Why this stream may not be served its identity's current
    /// certificate: `PERMISSION_DENIED` once the CA has rejected its JWT at
    /// a renewal; `UNAVAILABLE` when its JWT was not proven again at the
    /// last renewal (the identity keeps `MAX_JWTS_PER_IDENTITY` JWTs for
    /// renewals, and this one was not among them), so that Envoy reconnects
    /// and proves it anew.
    pub fn rejection(&self) -> Option<Status> {
        match self.sub.standing() {
            Standing::Proven => None,
            Standing::Rejected => Some(Status::permission_denied(format!(
                "the CA no longer accepts the JWT this stream was opened with (it was refused at a \
                 renewal of {}): open a new stream with the workload's current token",
                self.sub.identity
            ))),
            Standing::Unproven => Some(Status::unavailable(format!(
                "the JWT this stream was opened with was not proven again at the renewal of {} \
                 (MAX_JWTS_PER_IDENTITY JWTs that expire later are kept for renewals): reconnect \
                 to prove it and be served the renewed certificate",
                self.sub.identity
            ))),
        }
    }
}

/// How long before a JWT's `exp` a token file is read again:
/// [`TOKEN_FILE_REFRESH_MARGIN`], or a tenth of the token's life if shorter.
fn refresh_margin(claims: Option<&Claims>) -> Duration {
    claims
        .and_then(|c| c.expires_at?.checked_sub(c.issued_at?))
        .and_then(|life| u64::try_from(life).ok())
        .map(|life| Duration::from_millis(life.saturating_mul(100)))
        .map_or(TOKEN_FILE_REFRESH_MARGIN, |tenth| {
            tenth.min(TOKEN_FILE_REFRESH_MARGIN)
        })
}

/// What happened to the identity a stream serves.
#[derive(Debug)]
pub(crate) enum IdentityEvent {
    /// Its state (secret or trust bundle) changed.
    Changed,
    /// The manager dropped it.
    Dropped,
    /// Its credential asks something of the stream.
    Credential(CredentialDue),
}

/// Waits for the next [`IdentityEvent`] of the identity being served; pending
/// forever without one. Cancel-safe.
pub(crate) async fn next_event(current: &mut Option<Current>, token_file: bool) -> IdentityEvent {
    let Some(c) = current.as_mut() else {
        return std::future::pending().await;
    };
    tokio::select! {
        r = c.sub.secret.changed() => if r.is_ok() { IdentityEvent::Changed } else { IdentityEvent::Dropped },
        due = credential_due(c.expires, &mut c.next_refresh, token_file) => IdentityEvent::Credential(due),
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
    clock: &Clock,
) -> Option<Credential> {
    let current = current.as_ref()?;
    let new = source.get(clock).ok()?;
    (new != current.credential).then_some(new)
}

/// The status a stream ends with when its JWT expired at `exp`.
pub(crate) fn expired_status(exp: i64, source: &CredentialSource) -> Status {
    match source {
        CredentialSource::TokenFile(file) => Status::unauthenticated(format!(
            "the JWT at WORKLOAD_TOKEN_PATH {} expired at {exp} (Unix time) and was not replaced; \
             check the pod's projected service-account token volume",
            file.path().display()
        )),
        _ => Status::unauthenticated(format!(
            "the JWT this stream was opened with expired at {exp} (Unix time): open a new stream \
             with the workload's current token"
        )),
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
        assert_eq!(
            m(Some(i64::MIN), Some(i64::MAX)),
            TOKEN_FILE_REFRESH_MARGIN,
            "a life too long to count"
        );
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

//! Certificate authorities that sign the agent's CSRs: one module per provider
//! behind the [`CaClient`] trait, so the secret manager does not care which.

use std::time::Duration;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::crypto::IssuedChain;
use crate::identity::{Credential, IdentityError};
use crate::metrics::{CaOutcome, ErrorOutcome};

pub mod local;
pub mod queue;
pub mod vault;

/// Why a CA call failed. The variant decides how the caller retries; the
/// [`CaFailure`] inside carries what the CA said (HTTP status, Vault's
/// `errors`) as data, for callers that decide by code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CaError {
    /// The CA refused the request (bad credential, role or policy): retrying
    /// at once would not help, so the caller retries slowly.
    #[error("{0}")]
    Rejected(CaFailure),
    /// The same rejection, answered from memory: the CA refused this very
    /// credential (or token) moments ago and is not asked again yet. Logged
    /// quietly.
    #[error("{0}")]
    RecentlyRejected(CaFailure),
    /// The CA could not be reached or failed (connection, time-out, 429, 5xx,
    /// sealed, a standby without an active node): retried with back-off.
    #[error("{0}")]
    Unavailable(CaFailure),
    /// The CA answered something that cannot be used.
    #[error("{0}")]
    BadAnswer(CaFailure),
}

/// What a failed CA call reported: a message for people (what failed, where,
/// what to do; never a secret) and the facts a caller may branch on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFailure {
    message: String,
    /// The HTTP status the CA answered, when it answered one.
    status: Option<u16>,
    /// Vault's `errors` list, verbatim.
    errors: Vec<String>,
    /// Set when the agent refused the credential itself (an expired JWT),
    /// without asking the CA.
    credential: Option<IdentityError>,
    /// Set when the CA refused the token a call was made with (not a login's
    /// credential, not the request itself).
    token_refused: bool,
}

impl CaFailure {
    /// A failure described only by its message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            status: None,
            errors: Vec::new(),
            credential: None,
            token_refused: false,
        }
    }

    /// A failure the CA answered with an HTTP `status` and its `errors`.
    pub fn http(message: impl Into<String>, status: u16, errors: Vec<String>) -> Self {
        Self {
            status: Some(status),
            errors,
            ..Self::new(message)
        }
    }

    /// A credential the agent refused by itself (the CA was not asked).
    pub fn credential(message: impl Into<String>, error: IdentityError) -> Self {
        Self {
            credential: Some(error),
            ..Self::new(message)
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status the CA answered, if it answered one.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// Marks the failure as the CA refusing the token the call carried.
    pub fn token_refused(self) -> Self {
        Self {
            token_refused: true,
            ..self
        }
    }

    /// The same facts with the message wrapped by `f` (adding where it failed).
    pub fn map_message(self, f: impl FnOnce(&str) -> String) -> Self {
        Self {
            message: f(&self.message),
            ..self
        }
    }
}

impl std::fmt::Display for CaFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for CaFailure {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for CaFailure {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl CaError {
    /// A rejection described only by its message.
    pub fn rejected(message: impl Into<String>) -> Self {
        CaError::Rejected(CaFailure::new(message))
    }

    /// An unreachable or failing CA, described only by its message.
    pub fn unavailable(message: impl Into<String>) -> Self {
        CaError::Unavailable(CaFailure::new(message))
    }

    /// An unusable answer, described only by its message.
    pub fn bad_answer(message: impl Into<String>) -> Self {
        CaError::BadAnswer(CaFailure::new(message))
    }

    /// True for failures worth retrying soon.
    pub fn is_transient(&self) -> bool {
        matches!(self, CaError::Unavailable(_))
    }

    /// True when the CA refused the credential or the request (now or moments ago).
    pub fn is_rejection(&self) -> bool {
        matches!(self, CaError::Rejected(_) | CaError::RecentlyRejected(_))
    }

    /// True when this is a rejection answered from memory (the CA was not asked).
    pub fn is_repeat(&self) -> bool {
        matches!(self, CaError::RecentlyRejected(_))
    }

    /// The CA refused the token a sign was made with (for Vault: HTTP 403,
    /// the token revoked, expired, or its policy no longer allows the call),
    /// freshly, not from memory. A new login may help: [`CaClient::invalidate`]
    /// the authorization and log in once more. (A login refused is not this:
    /// see [`CaError::is_rejection`].)
    pub fn is_token_refused(&self) -> bool {
        matches!(self, CaError::Rejected(f) if f.token_refused)
    }

    pub fn message(&self) -> &str {
        self.failure().message()
    }

    /// The facts of the failure.
    pub fn failure(&self) -> &CaFailure {
        match self {
            CaError::Rejected(f)
            | CaError::RecentlyRejected(f)
            | CaError::Unavailable(f)
            | CaError::BadAnswer(f) => f,
        }
    }

    /// The HTTP status the CA answered, if it answered one.
    pub fn status(&self) -> Option<u16> {
        self.failure().status
    }

    /// Vault's `errors` list, verbatim (empty when it gave none).
    pub fn vault_errors(&self) -> &[String] {
        &self.failure().errors
    }

    /// Why the agent refused the credential itself (e.g. an expired JWT),
    /// when it did: the CA was not asked, and the workload must present a
    /// fresh credential (gRPC `UNAUTHENTICATED`).
    pub fn credential_error(&self) -> Option<&IdentityError> {
        self.failure().credential.as_ref()
    }

    /// The same error with its message wrapped by `f`.
    pub fn map_message(self, f: impl FnOnce(&str) -> String) -> Self {
        match self {
            CaError::Rejected(x) => CaError::Rejected(x.map_message(f)),
            CaError::RecentlyRejected(x) => CaError::RecentlyRejected(x.map_message(f)),
            CaError::Unavailable(x) => CaError::Unavailable(x.map_message(f)),
            CaError::BadAnswer(x) => CaError::BadAnswer(x.map_message(f)),
        }
    }
}

/// The outcome label of a failed CA request in the metrics.
impl ErrorOutcome for CaError {
    fn outcome(&self) -> Option<CaOutcome> {
        match self {
            // Refused by the agent itself: the CA was not asked.
            e if e.credential_error().is_some() => None,
            CaError::Rejected(_) => Some(CaOutcome::Rejected),
            // Answered from memory: the CA was not asked.
            CaError::RecentlyRejected(_) => None,
            CaError::Unavailable(_) => Some(CaOutcome::Unavailable),
            CaError::BadAnswer(_) => Some(CaOutcome::BadAnswer),
        }
    }
}

/// Proof that the CA accepted a workload's credential: what the CA needs to
/// sign on that workload's behalf (e.g. a Vault token). Never printed.
#[derive(Clone, Default)]
pub struct Authorization {
    pub(crate) token: Option<std::sync::Arc<Zeroizing<String>>>,
    /// Which login slot (a digest of the credential) the token came from, so
    /// that [`CaClient::invalidate`] finds it.
    pub(crate) slot: Option<[u8; 32]>,
}

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorization(redacted)")
    }
}

/// A certificate authority.
#[async_trait]
pub trait CaClient: Send + Sync + 'static {
    /// Short description for logs, e.g. `Vault at https://vault:8200`.
    fn describe(&self) -> String;

    /// Proves a workload's credential to the CA. Implementations cache the
    /// result per distinct credential for as long as the CA allows, and no
    /// longer than the credential itself is valid. An expired credential is
    /// refused without asking the CA ([`CaError::credential_error`]).
    async fn login(&self, credential: &Credential) -> Result<Authorization, CaError>;

    /// Proves `credential` to the CA again, whatever is cached for it: the
    /// authorization earned replaces the cached one (which is released). A
    /// renewal proves every JWT of the identity's streams this way, so that
    /// a JWT the CA no longer accepts (a deleted pod's) is found out before
    /// its stream receives the renewed certificate.
    async fn login_anew(&self, credential: &Credential) -> Result<Authorization, CaError>;

    /// The authorization cached for `credential`, if still valid, without
    /// contacting the CA (renewals use it before trying a new login). A login
    /// in flight for the same credential is waited for, not reported as none.
    async fn cached_login(&self, credential: &Credential) -> Option<Authorization>;

    /// Signs a CSR (PEM) for `ttl` on behalf of a logged-in workload. A
    /// rejection is remembered for a short hold-down, during which the same
    /// authorization gets [`CaError::RecentlyRejected`] without asking the CA.
    async fn sign(
        &self,
        auth: &Authorization,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError>;

    /// The roots the CA itself currently trusts (for Vault: every unexpired
    /// self-signed issuer of the PKI mount), PEM, one certificate each.
    /// `ROOTCA` is built from these, so that every agent of a mesh serves the
    /// same trust.
    async fn trust_roots(&self) -> Result<Vec<String>, CaError>;

    /// The CA refused `auth` when it was used (a revoked token, a changed
    /// role: [`CaError::is_token_refused`]): forget it, so that the next
    /// login asks the CA again. At most one forced re-login per credential
    /// per hold-down: a second call within it is ignored, so that a caller
    /// looping on a persistent refusal cannot hammer the CA.
    fn invalidate(&self, auth: &Authorization);

    /// `credential` is no longer needed (replaced, its identity evicted):
    /// drop what is cached for it and revoke it at the CA, best-effort.
    async fn release(&self, credential: &Credential);

    /// The agent is stopping: revoke every cached authorization, best-effort
    /// and within a short time budget.
    async fn shutdown(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_status_and_vault_errors_as_data() {
        let e = CaError::Rejected(
            CaFailure::http("sign refused", 403, vec!["permission denied".into()]).token_refused(),
        );
        assert!(e.is_rejection() && !e.is_transient() && !e.is_repeat());
        assert!(e.is_token_refused());
        assert_eq!(e.status(), Some(403));
        assert_eq!(e.vault_errors(), ["permission denied"]);
        assert_eq!(e.to_string(), "sign refused");
        let e = e.map_message(|m| format!("Vault at x: {m}"));
        assert_eq!(e.message(), "Vault at x: sign refused");
        assert_eq!(e.status(), Some(403), "wrapping keeps the data");

        // A 400 (the role refuses the CSR) is a rejection a new token cannot fix.
        let e = CaError::Rejected(CaFailure::http("bad", 400, vec![]));
        assert!(e.is_rejection() && !e.is_token_refused());
        // A login refused with 403 refused the credential, not a token.
        let e = CaError::Rejected(CaFailure::http("login", 403, vec![]));
        assert!(e.is_rejection() && !e.is_token_refused());
        // Answered from memory: not a fresh refusal of the token.
        let e = CaError::RecentlyRejected(CaFailure::http("again", 403, vec![]).token_refused());
        assert!(e.is_rejection() && e.is_repeat() && !e.is_token_refused());

        let e = CaError::unavailable("down");
        assert!(e.is_transient() && e.status().is_none() && e.vault_errors().is_empty());
        let e = CaError::Rejected(CaFailure::credential(
            "expired",
            IdentityError::Expired { exp: 5 },
        ));
        assert_eq!(
            e.credential_error(),
            Some(&IdentityError::Expired { exp: 5 })
        );
    }

    #[test]
    fn the_metrics_count_only_what_reached_the_ca() {
        let outcome = |e: CaError| e.outcome();
        assert_eq!(
            outcome(CaError::rejected("permission denied")),
            Some(CaOutcome::Rejected)
        );
        assert_eq!(
            outcome(CaError::unavailable("down")),
            Some(CaOutcome::Unavailable)
        );
        assert_eq!(
            outcome(CaError::bad_answer("garbage")),
            Some(CaOutcome::BadAnswer)
        );
        // Not requests: answered from memory, or refused by the agent itself.
        assert_eq!(outcome(CaError::RecentlyRejected("again".into())), None);
        assert_eq!(
            outcome(CaError::Rejected(CaFailure::credential(
                "expired",
                IdentityError::Expired { exp: 1 },
            ))),
            None
        );
    }
}

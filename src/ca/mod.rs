//! Certificate authorities that sign the agent's CSRs: one module per provider
//! behind the [`CaClient`] trait, so the secret manager does not care which.

use std::time::Duration;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::crypto::IssuedChain;
use crate::identity::Credential;

pub mod local;
pub mod vault;

/// Why a CA call failed. The kind decides how the caller retries.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CaError {
    /// The CA refused the request (bad credential, role or policy): retrying
    /// at once would not help, so the caller retries slowly.
    #[error("{0}")]
    Rejected(String),
    /// The same rejection, answered from memory: the CA refused this very
    /// credential moments ago and is not asked again yet. Logged quietly.
    #[error("{0}")]
    RecentlyRejected(String),
    /// The CA could not be reached or failed (connection, time-out, 429, 5xx,
    /// sealed): retried with back-off.
    #[error("{0}")]
    Unavailable(String),
    /// The CA answered something that cannot be used.
    #[error("{0}")]
    BadAnswer(String),
}

impl CaError {
    /// True for failures worth retrying soon.
    pub fn is_transient(&self) -> bool {
        matches!(self, CaError::Unavailable(_))
    }

    /// True when the CA refused the credential or the request (now or moments ago).
    pub fn is_rejection(&self) -> bool {
        matches!(self, CaError::Rejected(_) | CaError::RecentlyRejected(_))
    }

    pub fn message(&self) -> &str {
        match self {
            CaError::Rejected(m)
            | CaError::RecentlyRejected(m)
            | CaError::Unavailable(m)
            | CaError::BadAnswer(m) => m,
        }
    }
}

/// Proof that the CA accepted a workload's credential: what the CA needs to
/// sign on that workload's behalf (e.g. a Vault token). Never printed.
#[derive(Clone, Default)]
pub struct Authorization {
    pub(crate) token: Option<std::sync::Arc<Zeroizing<String>>>,
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
    /// result per distinct credential for as long as the CA allows.
    async fn login(&self, credential: &Credential) -> Result<Authorization, CaError>;

    /// The authorization cached for `credential`, if still valid, without
    /// contacting the CA (renewals use it before trying a new login). A login
    /// in flight for the same credential is waited for, not reported as none.
    async fn cached_login(&self, credential: &Credential) -> Option<Authorization>;

    /// Signs a CSR (PEM) for `ttl` on behalf of a logged-in workload.
    async fn sign(
        &self,
        auth: &Authorization,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError>;

    /// The roots the CA itself currently trusts (for Vault: every self-signed
    /// issuer of the PKI mount), PEM, one certificate each. `ROOTCA` is built
    /// from these, so that every agent of a mesh serves the same trust.
    // TODO(issue 9): implemented per provider; the default is only while the
    // providers are being written.
    async fn trust_roots(&self) -> Result<Vec<String>, CaError> {
        Ok(Vec::new())
    }

    /// The CA refused `auth` when it was used (a revoked token, a changed
    /// role): forget it, so that the next login asks the CA again.
    fn invalidate(&self, _auth: &Authorization) {}

    /// `credential` is no longer needed (replaced, its identity evicted):
    /// drop what is cached for it and revoke it at the CA, best-effort.
    async fn release(&self, _credential: &Credential) {}

    /// The agent is stopping: revoke every cached authorization, best-effort.
    async fn shutdown(&self) {}
}

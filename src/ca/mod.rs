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
    /// contacting the CA (renewals use it before trying a new login).
    fn cached_login(&self, credential: &Credential) -> Option<Authorization>;

    /// Signs a CSR (PEM) for `ttl` on behalf of a logged-in workload.
    async fn sign(
        &self,
        auth: &Authorization,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError>;
}

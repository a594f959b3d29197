//! What the agent says about its own state: read at scrape time by the
//! metrics and by `/debug/identities`, never copied, so it cannot drift.

use std::time::SystemTime;

use crate::secrets::SecretManager;

/// One cached identity, without anything secret (no key, no token, no JWT).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityReport {
    /// The SPIFFE ID.
    pub identity: String,
    /// e.g. `ec-p256`.
    pub key_type: String,
    /// Serial of the current certificate (hex), if one was issued.
    pub serial: Option<String>,
    pub not_after: Option<SystemTime>,
    /// When the renewal is scheduled.
    pub renew_at: Option<SystemTime>,
    /// SDS streams watching this identity.
    pub streams_open: usize,
    /// The last failure to issue or renew, until the next success.
    pub last_error: Option<String>,
}

/// The agent's state as the status server and the metrics see it.
pub trait AgentReport: Send + Sync + 'static {
    /// How many identities are cached.
    fn identities_cached(&self) -> usize;
    /// Every cached identity, or `None` when the cache cannot list them.
    fn identities(&self) -> Option<Vec<IdentityReport>>;
    /// CA requests waiting for a slot, or `None` when unknown.
    fn ca_queue_depth(&self) -> Option<usize>;
}

// TODO(issue 11, phase 2): list the identities (serial, expiry, renewal time,
// streams, last error) and the queue depth once the secret manager exposes them.
impl AgentReport for SecretManager {
    fn identities_cached(&self) -> usize {
        self.cached_identities()
    }

    fn identities(&self) -> Option<Vec<IdentityReport>> {
        None
    }

    fn ca_queue_depth(&self) -> Option<usize> {
        None
    }
}

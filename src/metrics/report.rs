//! What the agent says about its own state: read at scrape time by the
//! metrics and by `/debug/identities`, never copied, so it cannot drift.

use std::time::SystemTime;

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
    /// When the next renewal is attempted: the scheduled time, or after a
    /// failure the time of the retry.
    pub renew_at: Option<SystemTime>,
    /// When the current certificate falls due for renewal: its scheduled
    /// time, which failed attempts do not move (unlike `renew_at`), so that
    /// how long a renewal is overdue can be read from it.
    pub renewal_due: Option<SystemTime>,
    /// SDS streams (and other watchers) of this identity.
    pub streams_open: usize,
    /// The last failure to issue or renew, until the next success.
    pub last_error: Option<String>,
}

/// The agent's state as the status server and the metrics see it.
pub trait AgentReport: Send + Sync + 'static {
    /// Every cached identity.
    fn identities(&self) -> Vec<IdentityReport>;
    /// CA requests waiting for a slot.
    fn ca_queue_depth(&self) -> usize;
    /// Now, by the agent's clock: what the seconds left before each
    /// certificate's expiry are counted from.
    fn now(&self) -> SystemTime;
}

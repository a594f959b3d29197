//! Eviction: an identity no stream has watched for `SECRET_EVICTION_PERIOD`
//! leaves the cache with its key, and the JWTs it remembered are released at
//! the CA, so memory and CA tokens are bounded by the identities in use.
//!
//! The decision is made under the cache lock ([`Forget::Idle`]): an identity
//! that gained a watcher, or a subscriber, since it was found idle stays.

use tokio::time::{Duration, Instant};

use super::cache::{Entry, Forget};
use super::SecretManager;
use crate::identity::Credential;

/// How long an identity has gone unwatched.
#[derive(Debug, Default)]
pub(super) struct Idle {
    since: Option<Instant>,
}

impl Idle {
    /// Notes that nobody watches now; true once that has lasted `period`.
    pub fn for_at_least(&mut self, period: Duration) -> bool {
        self.since.get_or_insert_with(Instant::now).elapsed() >= period
    }

    /// Somebody watches.
    pub fn reset(&mut self) {
        self.since = None;
    }
}

impl SecretManager {
    /// Drops `entry` if still nobody watches it. Returns whether it was dropped.
    pub(super) fn evict(&self, entry: &Entry) -> bool {
        let Some(jwts) = self.cache.forget(entry, Forget::Idle) else {
            return false;
        };
        tracing::info!(identity = %entry.key.identity, "evicted idle identity and its key from the cache");
        self.release(jwts);
        true
    }

    /// Releases JWTs no longer needed at the CA (their tokens revoked),
    /// best-effort, in the background.
    pub(super) fn release(&self, jwts: impl IntoIterator<Item = Credential>) {
        let jwts: Vec<Credential> = jwts.into_iter().collect();
        if jwts.is_empty() {
            return;
        }
        let ca = self.ca.clone();
        tokio::spawn(async move {
            for jwt in jwts {
                ca.release(&jwt).await;
            }
        });
    }
}

//! One renewal of an identity's certificate.
//!
//! - It waits in the CA queue (behind first fetches) without holding the
//!   identity's fetch lock, so a first fetch of the same identity never
//!   queues behind it; if a fetch is running when its turn comes, the
//!   renewal stands down and the schedule looks again.
//! - It uses the JWTs of the identity's live streams, latest expiry first:
//!   the cached CA login of one, else a new login. A JWT the CA rejects is
//!   forgotten (and released) and the next is tried. Only when none is left
//!   do the identity's streams end, with `UNAVAILABLE`.
//! - A sign the CA rejects drops the token, logs in once more and retries
//!   the sign once, then reports.

use std::sync::Arc;

use super::cache::{Entry, Installed};
use super::issue::NewKey;
use super::{SecretError, SecretManager, WorkloadSecret};
use crate::ca::queue::Priority;
use crate::clock::rfc3339;

/// How a renewal went.
pub(super) enum Renewal {
    Renewed,
    /// Another fetch installed a certificate, or is installing one.
    StoodDown,
    /// No JWT of the identity's streams can be used: the reason its streams
    /// are ended with.
    NoCredential(String),
    /// The CA failed; retried with back-off.
    Failed(SecretError),
}

impl SecretManager {
    /// Renews `entry`, whose certificate is `current`.
    pub(super) async fn renew(&self, entry: &Arc<Entry>, current: &WorkloadSecret) -> Renewal {
        let identity = &entry.key.identity;
        let key = match NewKey::generate(self.opts.key_type, identity).await {
            Ok(k) => k,
            Err(e) => return Renewal::Failed(e),
        };
        let permit = self.queue.acquire(Priority::Rotation).await;
        let Ok(_fetching) = entry.fetch.try_lock() else {
            // A first fetch is running: let it finish, holding nothing.
            drop(permit);
            drop(entry.fetch.lock().await);
            return Renewal::StoodDown;
        };
        let still_current = entry
            .current()
            .is_some_and(|s| s.leaf.serial_hex == current.leaf.serial_hex);
        if !still_current {
            return Renewal::StoodDown;
        }

        let now = self.opts.clock.unix_now();
        let expired = entry.jwts().take_expired(now);
        let expired_count = expired.len();
        self.release(expired);
        let candidates = entry.jwts().live(now);
        let mut rejected = 0;
        let mut sign_retried = false;
        let mut i = 0;
        while let Some(jwt) = candidates.get(i) {
            let auth = match self.ca.cached_login(jwt).await {
                Some(auth) => auth,
                None => match self.ca.login(jwt).await {
                    Ok(auth) => auth,
                    Err(e) if e.is_rejection() => {
                        tracing::warn!(
                            identity = %identity,
                            jwt = %jwt.fingerprint(),
                            "the CA no longer accepts this JWT of a stream of the identity: {e}; forgetting it and renewing with another"
                        );
                        self.release(entry.jwts().forget(jwt));
                        rejected += 1;
                        i += 1;
                        continue;
                    }
                    Err(e) => return Renewal::Failed(SecretError::Login(e)),
                },
            };
            match self.sign_checked(identity, &auth, &key).await {
                Ok((chain, leaf)) => {
                    let secret = self.secret(identity, key, chain, leaf);
                    tracing::info!(
                        identity = %identity,
                        serial = %secret.leaf.serial_hex,
                        expires = %rfc3339(secret.leaf.not_after),
                        "renewed workload certificate; pushing it to every stream of this identity"
                    );
                    return match self.cache.install(entry, secret, self.trust.current()) {
                        Ok(Installed::Replaced | Installed::First) => Renewal::Renewed,
                        Err(_) => Renewal::StoodDown,
                    };
                }
                Err(e) if e.is_token_refused() => {
                    self.ca.invalidate(&auth);
                    if sign_retried {
                        return Renewal::Failed(e);
                    }
                    tracing::warn!(identity = %identity, "the CA refused to sign with a cached authorization: {e}; logging in again and retrying once");
                    // The same JWT again: its token is gone, so this logs in anew.
                    sign_retried = true;
                    crate::metrics::retry(crate::metrics::Retry::CaRequest);
                }
                Err(e) => return Renewal::Failed(e),
            }
        }
        Renewal::NoCredential(if rejected == 0 && expired_count > 0 {
            format!(
                "every JWT known for {identity} has expired: cannot renew; ending its streams with UNAVAILABLE \
                 so that Envoy reconnects with its refreshed token"
            )
        } else {
            format!(
                "no JWT of a stream of {identity} can renew it ({rejected} rejected by the CA, {expired_count} expired): \
                 ending its streams with UNAVAILABLE so that Envoy reconnects with its current token"
            )
        })
    }
}

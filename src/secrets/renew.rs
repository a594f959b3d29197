//! One renewal of an identity's certificate.
//!
//! - It waits in the CA queue (behind first fetches) without holding the
//!   identity's fetch lock, so a first fetch of the same identity never
//!   queues behind it; if a fetch is running when its turn comes, the
//!   renewal stands down and the schedule looks again.
//! - It proves every JWT of the identity's live streams to the CA again
//!   (one login each, whatever is cached), latest expiry first, and signs
//!   with the first proven. A JWT the CA rejects is forgotten (and
//!   released): its streams end with `PERMISSION_DENIED` before the renewed
//!   certificate is installed, and never receive it. Only when no JWT is
//!   proven do the identity's streams end, with `UNAVAILABLE`. The logins
//!   of idle JWTs are released.
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
        // No login outlives the renewal that last proved its JWT: an idle
        // JWT's reconnect logs in anew.
        let (candidates, mark, idle) = {
            let mut jwts = entry.jwts();
            (jwts.live(now), jwts.begin_renewal(), jwts.idle())
        };
        self.release(idle);
        // Every live JWT is proven again, whatever login is cached for it;
        // the first proven signs.
        let mut rejected = 0;
        let mut signer = None;
        for jwt in &candidates {
            // One login per JWT per renewal: an attempt after a failed one
            // uses the login the renewal already made with it.
            let again = if entry.jwts().proven_in_renewal(jwt, mark) {
                self.ca.cached_login(jwt).await
            } else {
                None
            };
            let proof = match again {
                Some(auth) => Ok(auth),
                None => self.ca.login_anew(jwt).await,
            };
            match proof {
                Ok(auth) => {
                    entry.jwts().proven(jwt);
                    signer.get_or_insert((jwt, auth));
                }
                Err(e) if e.is_rejection() => {
                    tracing::warn!(
                        identity = %identity,
                        jwt = %jwt.fingerprint(),
                        "the CA no longer accepts this JWT of a stream of the identity: {e}; forgetting it and \
                         renewing with another: its streams end with PERMISSION_DENIED"
                    );
                    self.release(entry.jwts().forget(jwt));
                    rejected += 1;
                }
                Err(e) => return Renewal::Failed(SecretError::Login(e)),
            }
        }
        if let Some((jwt, mut auth)) = signer {
            let mut sign_retried = false;
            loop {
                match self.sign_checked(identity, &auth, &key).await {
                    Ok((chain, leaf)) => {
                        let secret = self.secret(identity, key, chain, leaf);
                        tracing::info!(
                            identity = %identity,
                            serial = %secret.leaf.serial_hex,
                            expires = %rfc3339(secret.leaf.not_after),
                            "renewed workload certificate; pushing it to every stream of this identity whose JWT was proven"
                        );
                        entry.jwts().renewed(mark);
                        return match self.cache.install(entry, secret, self.trust.current()) {
                            Ok(Installed::Replaced | Installed::First) => Renewal::Renewed,
                            Err(_) => Renewal::StoodDown,
                        };
                    }
                    Err(e) if e.is_token_refused() && !sign_retried => {
                        self.ca.invalidate(&auth);
                        tracing::warn!(identity = %identity, "the CA refused to sign with the token it just gave: {e}; logging in again and retrying once");
                        sign_retried = true;
                        crate::metrics::retry(crate::metrics::Retry::CaRequest);
                        auth = match self.ca.login_anew(jwt).await {
                            Ok(auth) => auth,
                            Err(e) => return Renewal::Failed(SecretError::Login(e)),
                        };
                    }
                    Err(e) => {
                        if e.is_token_refused() {
                            self.ca.invalidate(&auth);
                        }
                        return Renewal::Failed(e);
                    }
                }
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

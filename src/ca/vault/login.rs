//! Vault logins, one slot per distinct JWT: the token Vault gave for it,
//! cached no longer than 90% of its lease nor past the JWT's own `exp`; the
//! rejections answered from memory for a short hold-down; and the tokens'
//! end (invalidated when Vault refuses them, revoked when no longer needed).
//!
//! A slot's async lock only coalesces logins (one login per JWT in flight);
//! its state sits behind a plain mutex never held across an `.await`, so
//! that `invalidate` (synchronous) and `cached_login` never see a busy slot
//! as an empty one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::http::VaultHttp;
use super::revoke::{revoke_in_background, Revocable};
use crate::ca::{Authorization, CaError, CaFailure};
use crate::clock::Clock;
use crate::identity::{Credential, IdentityError};
use crate::metrics::{self, CaKind};

/// How long a rejection (of a JWT at login, of a token at sign) is answered
/// from memory before Vault is asked again; also the least time between two
/// forced re-logins of one JWT.
pub const REJECTION_HOLD_DOWN: Duration = Duration::from_secs(5);
/// A token is re-used until this fraction of its lease is left.
const TOKEN_REFRESH_FRACTION: f64 = 0.1;
/// Lease assumed for a token Vault gives without one (lease 0: no expiry).
const UNBOUNDED_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Longest lease believed: Vault bounds leases by its `max_lease_ttl` (32
/// days unless set); an answer with a longer one is not a Vault answer.
pub(super) const MAX_LEASE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

type Key = [u8; 32];

/// The login slots of one Vault client.
pub(super) struct Logins {
    slots: Mutex<Slots>,
    /// What a JWT's `exp` is compared with.
    clock: Clock,
}

#[derive(Default)]
struct Slots {
    map: HashMap<Key, Arc<Slot>>,
    /// Size at which the map is next swept for lapsed slots (amortised O(1)).
    sweep_at: usize,
}

#[derive(Default)]
struct Slot {
    /// Held while logging in: concurrent logins with one JWT wait for the first.
    login: tokio::sync::Mutex<()>,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    token: Option<CachedToken>,
    /// The JWT's login rejection, answered from memory until the instant.
    rejected: Option<(CaFailure, Instant)>,
    /// When a token of this slot was last invalidated (a forced re-login).
    invalidated: Option<Instant>,
}

struct CachedToken {
    token: Arc<Zeroizing<String>>,
    /// Used until then: 90% of the lease, and never past the JWT's `exp`.
    until: Instant,
    /// When Vault's lease of the token ends.
    lease_end: Instant,
    /// Batch tokens cannot be revoked (and need not be).
    batch: bool,
    /// A sign rejection of this token, answered from memory until the instant.
    sign_rejected: Option<(CaFailure, Instant)>,
}

impl CachedToken {
    /// Worth revoking: a service token whose lease still runs.
    fn revocable(&self, now: Instant) -> bool {
        !self.batch && self.lease_end > now
    }
}

impl SlotState {
    /// True while the slot holds something worth keeping.
    fn live(&self, now: Instant) -> bool {
        self.token.as_ref().is_some_and(|t| t.until > now)
            || self
                .rejected
                .as_ref()
                .is_some_and(|(_, until)| *until > now)
            || self
                .invalidated
                .is_some_and(|at| at + REJECTION_HOLD_DOWN > now)
    }

    /// Takes a token that is past its use (for revocation).
    fn take_lapsed(&mut self, now: Instant) -> Option<CachedToken> {
        if self.token.as_ref().is_some_and(|t| t.until <= now) {
            self.token.take()
        } else {
            None
        }
    }
}

#[derive(Deserialize)]
struct LoginAnswer {
    auth: Option<LoginAuth>,
}

#[derive(Deserialize)]
pub(super) struct LoginAuth {
    pub(super) client_token: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    token_type: Option<String>,
}

/// The auth of a login answer, checked: a token that can be sent back as
/// a header, and a lease Vault could give.
pub(super) fn login_answer(v: serde_json::Value) -> Result<LoginAuth, CaError> {
    let answer: LoginAnswer = serde_json::from_value(v).map_err(|e| {
        CaError::bad_answer(format!(
            "the login answer is not a Vault auth response: {e}"
        ))
    })?;
    let auth = answer
        .auth
        .filter(|a| !a.client_token.is_empty())
        .ok_or_else(|| CaError::bad_answer("the login answer has no auth.client_token"))?;
    if reqwest::header::HeaderValue::from_str(&auth.client_token).is_err() {
        return Err(CaError::bad_answer(
            "the login answer's auth.client_token is not a token (it has characters a header cannot carry)",
        ));
    }
    if auth.lease_duration > MAX_LEASE.as_secs() {
        return Err(CaError::bad_answer(format!(
            "the login answer's auth.lease_duration, {}s, is longer than any Vault lease",
            auth.lease_duration
        )));
    }
    Ok(auth)
}

impl LoginAuth {
    /// The token's lease ([`UNBOUNDED_LEASE`] when Vault gives none).
    pub(super) fn lease(&self) -> Duration {
        if self.lease_duration == 0 {
            UNBOUNDED_LEASE
        } else {
            Duration::from_secs(self.lease_duration)
        }
    }

    /// Batch tokens say so (`token_type`), or by their prefix on servers that
    /// do not (`hvb.` on Vault, `b.` on OpenBao).
    pub(super) fn is_batch(&self) -> bool {
        match self.token_type.as_deref() {
            Some(t) => t == "batch",
            None => self.client_token.starts_with("hvb.") || self.client_token.starts_with("b."),
        }
    }
}

fn key_of(credential: &Credential) -> Key {
    credential.sha256()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Until when a token with `lease` is used: 90% of the lease, and never past
/// the JWT's `exp` (given with the Unix time of `now`).
pub(super) fn cache_until(
    now: Instant,
    lease: Duration,
    exp_and_unix_now: Option<(i64, i64)>,
) -> Instant {
    let by_lease = now + lease.mul_f64(1.0 - TOKEN_REFRESH_FRACTION);
    match exp_and_unix_now {
        Some((exp, unix_now)) => {
            let left = exp.saturating_sub(unix_now).max(0) as u64;
            // An `exp` too far off to add to an instant bounds nothing.
            now.checked_add(Duration::from_secs(left))
                .map_or(by_lease, |by_exp| by_lease.min(by_exp))
        }
        None => by_lease,
    }
}

impl Logins {
    pub fn new(clock: Clock) -> Self {
        Self {
            slots: Mutex::default(),
            clock,
        }
    }

    /// The slot of `key`, made if missing. Sweeps lapsed slots now and then,
    /// so memory stays bounded by the JWTs in use; their tokens are returned
    /// for revocation.
    fn slot(&self, key: Key) -> (Arc<Slot>, Vec<Revocable>) {
        let mut slots = lock(&self.slots);
        let mut lapsed = Vec::new();
        if !slots.map.contains_key(&key) && slots.map.len() >= slots.sweep_at {
            let now = Instant::now();
            slots.map.retain(|_, slot| {
                let mut st = lock(&slot.state);
                if let Some(t) = st.take_lapsed(now) {
                    if t.revocable(now) {
                        lapsed.push(Revocable(t.token));
                    }
                }
                // Kept while in use (a login in flight holds a clone) or live.
                Arc::strong_count(slot) > 1 || st.live(now)
            });
            slots.sweep_at = (slots.map.len() * 2).max(64);
        }
        let slot = slots.map.entry(key).or_default().clone();
        (slot, lapsed)
    }

    fn existing(&self, key: &Key) -> Option<Arc<Slot>> {
        lock(&self.slots).map.get(key).cloned()
    }

    /// Logs in with `credential` (see the module documentation). With
    /// `anew`, a cached token is not used: Vault judges the JWT again, and
    /// the token it gives replaces the cached one, which is revoked.
    pub async fn login(
        &self,
        http: &VaultHttp,
        auth_path: &str,
        role: &str,
        credential: &Credential,
        anew: bool,
    ) -> Result<Authorization, CaError> {
        // An expired JWT proves nothing, whatever Vault said about it before:
        // refused before any cache lookup.
        let exp = match credential.current_claims_by(&self.clock) {
            Ok(claims) => claims.expires_at,
            Err(e @ IdentityError::Expired { .. }) => {
                // Whatever token it earned is of no use any more.
                if let Some(token) = self.release(credential) {
                    revoke_in_background(http, vec![token]);
                }
                return Err(CaError::Rejected(CaFailure::credential(
                    format!("refused without asking Vault at {}: {e}", http.addr()),
                    e,
                )));
            }
            // Not a JWT the agent can read: Vault is the judge.
            Err(_) => None,
        };
        let key = key_of(credential);
        let (slot, lapsed) = self.slot(key);
        revoke_in_background(http, lapsed);
        let _login = slot.login.lock().await;
        let now = Instant::now();
        let stale = {
            let mut st = lock(&slot.state);
            if let Some(t) = &st.token {
                if t.until > now && !anew {
                    return Ok(authorization(&t.token, key));
                }
            }
            if let Some((failure, until)) = &st.rejected {
                if *until > now {
                    return Err(CaError::RecentlyRejected(failure.clone()));
                }
            }
            if anew {
                st.token.take()
            } else {
                st.take_lapsed(now)
            }
        };
        if let Some(t) = stale.filter(|t| t.revocable(now)) {
            revoke_in_background(http, vec![Revocable(t.token)]);
        }

        let body = json!({ "role": role, "jwt": credential.expose() });
        let result = metrics::ca_request(CaKind::Login, async {
            login_answer(http.post_json(auth_path, None, &body).await?)
        })
        .await;
        let now = Instant::now();
        match result {
            Ok(auth) => {
                let lease = auth.lease();
                let batch = auth.is_batch();
                let (token, until) = self.keep(&slot, auth, exp, now);
                tracing::info!(
                    vault = %http.addr(),
                    lease_seconds = lease.as_secs(),
                    cached_seconds = until.saturating_duration_since(now).as_secs(),
                    token_type = if batch { "batch" } else { "service" },
                    "logged in to Vault"
                );
                Ok(authorization(&token, key))
            }
            Err(e) => {
                // The tutorial's line.
                tracing::error!("failed to login Vault: {}", e.message());
                let e = e.map_message(|m| format!("failed to login Vault at {}: {m}", http.addr()));
                if let CaError::Rejected(failure) = &e {
                    lock(&slot.state).rejected = Some((failure.clone(), now + REJECTION_HOLD_DOWN));
                }
                Err(e)
            }
        }
    }

    /// Caches the token Vault gave at `now` for the JWT of `slot`, which
    /// expires at `exp`: used until 90% of its lease, and never past `exp`
    /// by the clock. Returns the token and until when it is used.
    fn keep(
        &self,
        slot: &Slot,
        auth: LoginAuth,
        exp: Option<i64>,
        now: Instant,
    ) -> (Arc<Zeroizing<String>>, Instant) {
        let lease = auth.lease();
        let until = cache_until(now, lease, exp.map(|e| (e, self.clock.unix_now())));
        let batch = auth.is_batch();
        let token = Arc::new(Zeroizing::new(auth.client_token));
        let mut st = lock(&slot.state);
        st.token = Some(CachedToken {
            token: token.clone(),
            until,
            lease_end: now + lease,
            batch,
            sign_rejected: None,
        });
        st.rejected = None;
        (token, until)
    }

    /// The token cached for `credential`, waiting for a login in flight.
    pub async fn cached(&self, credential: &Credential) -> Option<Authorization> {
        if credential
            .current_claims_by(&self.clock)
            .is_err_and(|e| matches!(e, IdentityError::Expired { .. }))
        {
            return None;
        }
        let key = key_of(credential);
        let slot = self.existing(&key)?;
        let _login = slot.login.lock().await;
        let st = lock(&slot.state);
        st.token
            .as_ref()
            .filter(|t| t.until > Instant::now())
            .map(|t| authorization(&t.token, key))
    }

    /// The remembered sign rejection of `auth`'s token, if still held down.
    pub fn sign_held_down(&self, auth: &Authorization) -> Option<CaFailure> {
        self.with_token(auth, |t| {
            t.sign_rejected
                .as_ref()
                .filter(|(_, until)| *until > Instant::now())
                .map(|(f, _)| f.clone())
        })
        .flatten()
    }

    /// Remembers that Vault refused to sign with `auth`'s token.
    pub fn note_sign_rejection(&self, auth: &Authorization, failure: &CaFailure) {
        self.with_token(auth, |t| {
            t.sign_rejected = Some((failure.clone(), Instant::now() + REJECTION_HOLD_DOWN));
        });
    }

    /// Runs `f` on the cached token `auth` carries, if it is still the one cached.
    fn with_token<R>(
        &self,
        auth: &Authorization,
        f: impl FnOnce(&mut CachedToken) -> R,
    ) -> Option<R> {
        let (Some(key), Some(token)) = (&auth.slot, &auth.token) else {
            return None;
        };
        let slot = self.existing(key)?;
        let mut st = lock(&slot.state);
        st.token
            .as_mut()
            .filter(|t| Arc::ptr_eq(&t.token, token))
            .map(f)
    }

    /// Drops `auth`'s token (Vault refused it), unless this JWT was already
    /// forced to log in again within the hold-down.
    pub fn invalidate(&self, auth: &Authorization) {
        let (Some(key), Some(token)) = (&auth.slot, &auth.token) else {
            return;
        };
        let Some(slot) = self.existing(key) else {
            return;
        };
        let now = Instant::now();
        let mut st = lock(&slot.state);
        if !st
            .token
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(&t.token, token))
        {
            return; // already replaced
        }
        if st
            .invalidated
            .is_some_and(|at| at + REJECTION_HOLD_DOWN > now)
        {
            tracing::debug!("Vault refused a token again within the hold-down; keeping it until the hold-down ends");
            return;
        }
        st.token = None;
        st.invalidated = Some(now);
        tracing::info!("dropped a Vault token that Vault refused; the next request logs in again");
    }

    /// Drops what is cached for `credential`; its token, to revoke.
    pub fn release(&self, credential: &Credential) -> Option<Revocable> {
        let key = key_of(credential);
        let slot = {
            let mut slots = lock(&self.slots);
            let slot = slots.map.get(&key)?.clone();
            // A login in flight keeps its slot (it holds a clone); it is
            // swept once lapsed.
            if Arc::strong_count(&slot) == 2 {
                slots.map.remove(&key);
            }
            slot
        };
        let now = Instant::now();
        let token = lock(&slot.state).token.take()?;
        token.revocable(now).then_some(Revocable(token.token))
    }

    /// Takes every cached token; those to revoke are returned.
    pub fn take_all(&self) -> Vec<Revocable> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).map.drain().map(|(_, s)| s).collect();
        let now = Instant::now();
        slots
            .iter()
            .filter_map(|s| lock(&s.state).token.take())
            .filter(|t| t.revocable(now))
            .map(|t| Revocable(t.token))
            .collect()
    }
}

fn authorization(token: &Arc<Zeroizing<String>>, key: Key) -> Authorization {
    Authorization {
        token: Some(token.clone()),
        slot: Some(key),
    }
}

#[cfg(test)]
#[path = "login_tests.rs"]
mod tests;

//! The JWTs an identity is renewed with: those of its live streams, bounded.
//!
//! Each stream (or `FetchSecrets` call) of an identity proved its own JWT to
//! the CA. Renewal may use any of them that the CA still accepts, so a pod
//! that is deleted (its JWT now refused) does not stop the renewals of the
//! other pods of the same service account.
//!
//! - At most `MAX_JWTS_PER_IDENTITY` are remembered. When full, a new JWT
//!   displaces an idle one, else the live one that expires first (if the new
//!   one expires later); a displaced JWT is handed back to be released at
//!   the CA (its Vault token revoked).
//! - A JWT the CA rejects at renewal is forgotten, and its number is
//!   remembered (the last [`REJECTED_MEMORY`]), so that the streams opened
//!   with it learn that it no longer proves their identity and end
//!   ([`JwtLease::rejected`]), rather than keep receiving the certificates
//!   other pods' JWTs renew.
//! - Every renewal proves each live JWT to the CA again ([`Jwts::proven`]),
//!   whatever login is cached for it, before the renewed certificate is
//!   installed. A stream is served a renewed certificate only if its JWT was
//!   proven for it: proven at that renewal, or by the stream's own subscribe
//!   since the renewal began ([`JwtLease::standing`]). Any other stream (its
//!   JWT rejected, or never remembered because the identity is full of JWTs
//!   that outlive it) ends instead.
//! - A JWT is live while a stream holds it. When its last stream ends it
//!   leaves the renewal set but is kept, idle, so that a reconnect with the
//!   same JWT finds its place; its CA login is released at the next renewal,
//!   so that no token outlives the renewal that last proved its JWT. It is
//!   forgotten when displaced, when it expires, or when the identity leaves
//!   the cache.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use super::cache::Entry;
use crate::identity::Credential;

/// The remembered JWTs of one identity.
pub(super) struct Jwts {
    cap: usize,
    held: Vec<Held>,
    /// Numbers each remembered JWT, so that a lease of a JWT that was
    /// displaced and remembered again does not count for the new one.
    next_epoch: u64,
    /// Epochs of the JWTs the CA rejected, newest last, bounded.
    rejected: VecDeque<u64>,
    /// Counts proofs of JWTs (a stream's subscribe, a renewal's login).
    proofs: u64,
    /// `proofs` when the last completed renewal began proving: a JWT last
    /// proven at or before it was not proven for the certificate served.
    renewed_from: u64,
    /// `proofs` when the renewal in progress (which may take several
    /// attempts) began.
    renewing_since: Option<u64>,
}

/// Where a stream stands with the certificate its identity now serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Its JWT was proven for it.
    Proven,
    /// The CA rejected its JWT at a renewal.
    Rejected,
    /// Its JWT was not proven at the last renewal (not remembered: the
    /// identity holds `MAX_JWTS_PER_IDENTITY` JWTs that outlive it).
    Unproven,
}

/// How many rejected JWTs an identity remembers for its streams to see.
pub const REJECTED_MEMORY: usize = 64;

struct Held {
    credential: Credential,
    /// `exp`, or `i64::MAX` for a JWT without one.
    expires_at: i64,
    streams: usize,
    epoch: u64,
    /// The proof (see [`Jwts::proofs`]) that last proved it.
    proven: u64,
    /// The proof made by the last renewal's login with it.
    reproven: u64,
}

impl Jwts {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            held: Vec::new(),
            next_epoch: 0,
            rejected: VecDeque::new(),
            proofs: 0,
            renewed_from: 0,
            renewing_since: None,
        }
    }

    fn next_proof(&mut self) -> u64 {
        self.proofs += 1;
        self.proofs
    }

    /// Counts one more stream for `credential`, which the stream has just
    /// proven, remembering it if it is new. Returns its epoch if it is
    /// remembered, and the JWTs it displaced.
    fn hold(&mut self, credential: &Credential) -> (Option<u64>, Vec<Credential>) {
        let proof = self.next_proof();
        if let Some(h) = self.held.iter_mut().find(|h| h.credential == *credential) {
            h.streams += 1;
            h.proven = proof;
            return (Some(h.epoch), Vec::new());
        }
        let expires_at = expiry(credential);
        let mut displaced = Vec::new();
        if self.held.len() >= self.cap {
            let idle = self
                .held
                .iter()
                .enumerate()
                .filter(|(_, h)| h.streams == 0)
                .min_by_key(|(_, h)| h.expires_at);
            let victim = match idle {
                Some((i, _)) => Some(i),
                None => self
                    .held
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, h)| h.expires_at)
                    .filter(|(_, h)| h.expires_at < expires_at)
                    .map(|(i, _)| i),
            };
            match victim {
                Some(i) => displaced.push(self.held.swap_remove(i).credential),
                None => return (None, displaced),
            }
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.held.push(Held {
            credential: credential.clone(),
            expires_at,
            streams: 1,
            epoch,
            proven: proof,
            reproven: 0,
        });
        (Some(epoch), displaced)
    }

    fn unhold(&mut self, credential: &Credential, epoch: u64) {
        if let Some(h) = self
            .held
            .iter_mut()
            .find(|h| h.epoch == epoch && h.credential == *credential)
        {
            h.streams = h.streams.saturating_sub(1);
        }
    }

    /// The JWTs of live streams not expired at `now_unix`, the one that
    /// expires last first.
    pub fn live(&self, now_unix: i64) -> Vec<Credential> {
        let mut live: Vec<&Held> = self
            .held
            .iter()
            .filter(|h| h.streams > 0 && h.expires_at > now_unix)
            .collect();
        live.sort_by_key(|h| std::cmp::Reverse(h.expires_at));
        live.into_iter().map(|h| h.credential.clone()).collect()
    }

    /// An attempt at renewing begins proving the live JWTs: the mark of
    /// the renewal (the same for every attempt until one succeeds), to pass
    /// to [`Jwts::renewed`] once they are proven.
    pub fn begin_renewal(&mut self) -> u64 {
        *self.renewing_since.get_or_insert(self.proofs)
    }

    /// The CA accepted `credential` again at a renewal.
    pub fn proven(&mut self, credential: &Credential) {
        let proof = self.next_proof();
        if let Some(h) = self.held.iter_mut().find(|h| h.credential == *credential) {
            h.proven = proof;
            h.reproven = proof;
        }
    }

    /// True when an earlier attempt of the renewal that began at `mark`
    /// already proved `credential` to the CA: its login is not made again.
    pub fn proven_in_renewal(&self, credential: &Credential, mark: u64) -> bool {
        self.held
            .iter()
            .any(|h| h.credential == *credential && h.reproven > mark)
    }

    /// The renewal that began at `mark` is about to serve its certificate:
    /// from now on only JWTs proven since `mark` stand.
    pub fn renewed(&mut self, mark: u64) {
        self.renewed_from = self.renewed_from.max(mark);
        self.renewing_since = None;
    }

    /// The idle JWTs (no stream holds them), whose CA logins a renewal
    /// releases.
    pub fn idle(&self) -> Vec<Credential> {
        self.held
            .iter()
            .filter(|h| h.streams == 0)
            .map(|h| h.credential.clone())
            .collect()
    }

    /// Where a lease of the JWT remembered as `epoch` (or of a JWT never
    /// remembered, proven as `joined`) stands.
    fn standing(&self, held: Option<u64>, joined: u64) -> Standing {
        if held.is_some_and(|epoch| self.was_rejected(epoch)) {
            return Standing::Rejected;
        }
        let proven = held
            .and_then(|epoch| self.held.iter().find(|h| h.epoch == epoch))
            .map_or(joined, |h| h.proven);
        if proven > self.renewed_from {
            Standing::Proven
        } else {
            Standing::Unproven
        }
    }

    /// True when some stream holds a remembered JWT.
    pub fn has_live(&self) -> bool {
        self.held.iter().any(|h| h.streams > 0)
    }

    /// Forgets a JWT the CA rejected; returns it if it was remembered.
    pub fn forget(&mut self, credential: &Credential) -> Option<Credential> {
        let i = self.held.iter().position(|h| h.credential == *credential)?;
        let held = self.held.swap_remove(i);
        if self.rejected.len() >= REJECTED_MEMORY {
            self.rejected.pop_front();
        }
        self.rejected.push_back(held.epoch);
        Some(held.credential)
    }

    /// True when the JWT remembered as `epoch` was rejected by the CA.
    fn was_rejected(&self, epoch: u64) -> bool {
        self.rejected.contains(&epoch)
    }

    /// Forgets and returns the JWTs expired at `now_unix`.
    pub fn take_expired(&mut self, now_unix: i64) -> Vec<Credential> {
        let (expired, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.expires_at <= now_unix);
        self.held = kept;
        expired.into_iter().map(|h| h.credential).collect()
    }

    /// Forgets and returns every JWT (the identity leaves the cache).
    pub fn take_all(&mut self) -> Vec<Credential> {
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|h| h.credential)
            .collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.held.len()
    }
}

fn expiry(credential: &Credential) -> i64 {
    credential.expires_at().unwrap_or(i64::MAX)
}

/// One stream's hold on its JWT; dropped when the stream ends.
pub struct JwtLease {
    entry: Weak<Entry>,
    held: Option<(Credential, u64)>,
    /// The proof its subscribe made (see [`Jwts::proofs`]).
    joined: u64,
}

impl JwtLease {
    /// Counts a stream for `credential` on `entry` (the caller holds the
    /// cache lock). Also returns the JWTs it displaced.
    pub(super) fn hold(entry: &Arc<Entry>, credential: &Credential) -> (Self, Vec<Credential>) {
        let mut jwts = entry.jwts();
        let (epoch, displaced) = jwts.hold(credential);
        let lease = JwtLease {
            entry: Arc::downgrade(entry),
            held: epoch.map(|e| (credential.clone(), e)),
            joined: jwts.proofs,
        };
        (lease, displaced)
    }
}

impl JwtLease {
    /// Where the stream holding this lease stands with the certificate its
    /// identity serves now (see [`Standing`]).
    pub fn standing(&self) -> Standing {
        match self.entry.upgrade() {
            Some(entry) => entry
                .jwts()
                .standing(self.held.as_ref().map(|(_, e)| *e), self.joined),
            None => Standing::Proven,
        }
    }
}

impl std::fmt::Debug for JwtLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtLease")
    }
}

impl Drop for JwtLease {
    fn drop(&mut self) {
        if let (Some(entry), Some((credential, epoch))) = (self.entry.upgrade(), &self.held) {
            entry.jwts().unhold(credential, *epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::test_support::jwt;

    #[test]
    fn live_jwts_latest_expiry_first_and_idle_ones_left_out() {
        let mut j = Jwts::new(4);
        let (a, b, c) = (jwt("x", Some(100)), jwt("x", Some(300)), jwt("x", None));
        let (ea, _) = j.hold(&a);
        let (eb, _) = j.hold(&b);
        let (eb2, _) = j.hold(&b);
        assert_eq!(eb, eb2);
        j.hold(&c);
        assert_eq!(j.live(0), [c.clone(), b.clone(), a.clone()]);
        assert_eq!(j.live(100), [c.clone(), b.clone()], "expired at 100");

        // b has two streams: it stays live until both end.
        j.unhold(&b, eb.unwrap());
        assert_eq!(j.live(0), [c.clone(), b.clone(), a.clone()]);
        j.unhold(&b, eb.unwrap());
        assert_eq!(j.live(0), [c.clone(), a.clone()]);
        assert_eq!(j.len(), 3, "idle, still remembered");
        assert!(j.has_live());
        j.unhold(&a, ea.unwrap());
        assert_eq!(j.take_expired(150), std::slice::from_ref(&a));
        assert_eq!(j.forget(&c), Some(c.clone()));
        assert!(!j.has_live());
        assert_eq!(j.take_all(), [b]);
    }

    #[test]
    fn a_rejected_jwt_is_remembered_by_epoch_and_boundedly() {
        let mut j = Jwts::new(2);
        let (a, b) = (jwt("x", Some(100)), jwt("x", Some(200)));
        let (ea, _) = j.hold(&a);
        let (eb, _) = j.hold(&b);
        assert_eq!(j.forget(&a), Some(a.clone()));
        assert!(j.was_rejected(ea.unwrap()));
        assert!(!j.was_rejected(eb.unwrap()), "b was not rejected");
        // Remembered again, a is a new JWT with a new epoch: not rejected.
        let (ea2, _) = j.hold(&a);
        assert!(!j.was_rejected(ea2.unwrap()));
        // The memory is bounded: the oldest rejection is dropped first.
        for i in 0..REJECTED_MEMORY {
            let c = jwt(&format!("c{i}"), Some(300));
            j.hold(&c);
            j.forget(&c);
        }
        assert!(!j.was_rejected(ea.unwrap()), "pushed out");
        assert!(j.rejected.len() == REJECTED_MEMORY);
    }

    #[test]
    fn bounded_displacing_idle_then_soonest_expiring() {
        let mut j = Jwts::new(2);
        let (a, b, c, d) = (
            jwt("x", Some(100)),
            jwt("x", Some(200)),
            jwt("x", Some(300)),
            jwt("x", Some(50)),
        );
        let (ea, _) = j.hold(&a);
        let (eb, _) = j.hold(&b);
        // Full of live JWTs: c displaces a, which expires first.
        let (ec, out) = j.hold(&c);
        assert!(ec.is_some());
        assert_eq!(out, std::slice::from_ref(&a));
        // d expires before all of them: not remembered, nothing displaced.
        let (ed, out) = j.hold(&d);
        assert_eq!((ed, out.len()), (None, 0));
        assert_eq!(j.live(0), [c.clone(), b.clone()]);
        // An old lease of a displaced JWT does not count for it once it is back.
        j.unhold(&b, eb.unwrap());
        let (_, out) = j.hold(&a);
        assert_eq!(out, std::slice::from_ref(&b), "the idle one goes first");
        j.unhold(&a, ea.unwrap());
        assert_eq!(j.live(0), [c, a], "a's old lease did not end its new hold");
    }
}

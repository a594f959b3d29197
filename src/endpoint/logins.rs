//! What a JWT costs before it may reach the CA.
//!
//! Every pod that reaches the socket holds a JWT Vault accepts, and can mint
//! none that it does not; but nothing stops it from presenting thousands of
//! forged ones, each of which would cost a Vault login and a TokenReview. So
//! a JWT new to its peer ([`super::peers`]) spends a token of the peer's
//! bucket (`SDS_PEER_NEW_JWT_BURST`, refilled one per
//! `SDS_PEER_NEW_JWT_INTERVAL`) and one of its connection's
//! (`SDS_CONNECTION_NEW_JWT_BURST` / `_INTERVAL`), and takes a place among
//! the peer's and the connection's logins in flight
//! (`SDS_PEER_MAX_LOGINS_IN_FLIGHT`, `SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT`).
//! The peer's budget lives as long as the peer, so reconnecting does not
//! refill it. A refusal spends nothing.
//!
//! A JWT becomes known to the peer only once the CA has proven it (a fetch
//! it allowed succeeded, [`super::connection::Connection::proven`]); a known
//! JWT costs nothing. A repeat of a JWT whose login is in flight costs
//! nothing either (the CA client coalesces logins per JWT) but is not known
//! by it: if the CA rejects the JWT, its next repeat spends a token again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::peers::Peer;
use crate::identity::Credential;
use crate::secrets::SecretError;

/// How many proven JWT fingerprints a peer remembers (32 bytes each). A JWT
/// forgotten this way costs a token again if presented again.
pub(crate) const KNOWN_JWTS: usize = 64;

/// The settings of one budget, for its refusals.
#[derive(Debug)]
pub(crate) struct Names {
    pub whose: &'static str,
    pub in_flight: &'static str,
    pub burst: &'static str,
    pub interval: &'static str,
}

pub(crate) const CONNECTION: Names = Names {
    whose: "this connection",
    in_flight: "SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT",
    burst: "SDS_CONNECTION_NEW_JWT_BURST",
    interval: "SDS_CONNECTION_NEW_JWT_INTERVAL",
};

pub(crate) const PEER: Names = Names {
    whose: "this peer",
    in_flight: "SDS_PEER_MAX_LOGINS_IN_FLIGHT",
    burst: "SDS_PEER_NEW_JWT_BURST",
    interval: "SDS_PEER_NEW_JWT_INTERVAL",
};

/// A token bucket and a bound on logins in flight.
#[derive(Debug)]
pub(crate) struct Budget {
    bucket: Mutex<TokenBucket>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    names: &'static Names,
}

impl Budget {
    pub fn new(
        names: &'static Names,
        max_in_flight: usize,
        burst: u32,
        interval: Duration,
    ) -> Self {
        Self {
            bucket: Mutex::new(TokenBucket::new(burst, interval)),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            names,
        }
    }

    fn place(&self) -> Result<OwnedSemaphorePermit, SecretError> {
        let n = self.names;
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| SecretError::LimitReached {
                setting: n.in_flight,
                message: format!(
                    "{} already has {} logins with new JWTs waiting on the CA ({}={}); \
                     the CA was not asked",
                    n.whose, self.max_in_flight, n.in_flight, self.max_in_flight
                ),
            })
    }

    /// The bucket, if it holds a token now; it is taken only by
    /// [`TokenBucket::take`], so that a refusal by another budget spends none.
    fn token(&self, now: Instant) -> Result<MutexGuard<'_, TokenBucket>, SecretError> {
        let mut bucket = self.bucket.lock().expect("login budget lock");
        if bucket.ready(now) {
            return Ok(bucket);
        }
        let n = self.names;
        Err(SecretError::LimitReached {
            setting: n.burst,
            message: format!(
                "{} presented too many different JWTs ({}={}, then one per {}={:?}); \
                 the CA was not asked",
                n.whose, n.burst, bucket.capacity, n.interval, bucket.interval
            ),
        })
    }
}

/// The JWTs of one peer: proven (oldest first), and those whose login is
/// in flight (with how many admissions wait on it).
#[derive(Debug, Default)]
pub(crate) struct Known {
    state: Mutex<KnownState>,
}

#[derive(Debug, Default)]
struct KnownState {
    proven: VecDeque<[u8; 32]>,
    pending: HashMap<[u8; 32], usize>,
}

impl Known {
    fn lock(&self) -> MutexGuard<'_, KnownState> {
        self.state.lock().expect("known JWTs lock")
    }

    pub fn prove(&self, key: [u8; 32]) {
        let mut s = self.lock();
        if s.proven.contains(&key) {
            return;
        }
        if s.proven.len() == KNOWN_JWTS {
            s.proven.pop_front();
        }
        s.proven.push_back(key);
    }

    #[cfg(test)]
    pub fn proven_len(&self) -> usize {
        self.lock().proven.len()
    }
}

/// Whether the identity a credential names is cached already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Cached, or the credential names none (its fetch fails before the CA).
    Cached,
    /// Not cached: the fetch would add it (`SDS_PEER_MAX_IDENTITIES`).
    New(String),
}

/// Permission for one fetch to reach the CA with a credential. Hold it
/// until the fetch has ended; on success hand it to
/// [`super::connection::Connection::proven`].
#[derive(Debug)]
pub struct Admission {
    pub(crate) key: [u8; 32],
    pub(crate) kind: Kind,
    /// The identity the fetch would add to the cache, counted against the
    /// peer's share once proven.
    pub(crate) new_identity: Option<String>,
    _pending: Option<PendingLogin>,
}

#[derive(Debug)]
pub(crate) enum Kind {
    /// The peer's CA proved this JWT before: its login is cached.
    Known,
    /// A login with this JWT is in flight for the peer: coalesced with it.
    InFlight,
    /// A JWT new to the peer: its places among the logins in flight.
    New(#[allow(dead_code)] [OwnedSemaphorePermit; 2]),
}

impl Admission {
    pub fn is_known(&self) -> bool {
        matches!(self.kind, Kind::Known)
    }

    pub fn is_in_flight(&self) -> bool {
        matches!(self.kind, Kind::InFlight)
    }

    pub fn is_new(&self) -> bool {
        matches!(self.kind, Kind::New(_))
    }
}

/// A JWT counted as in flight for its peer while this lives.
#[derive(Debug)]
struct PendingLogin {
    peer: Arc<Peer>,
    key: [u8; 32],
}

impl Drop for PendingLogin {
    fn drop(&mut self) {
        let mut s = self.peer.known.lock();
        if let Some(n) = s.pending.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                s.pending.remove(&self.key);
            }
        }
    }
}

/// Lets `credential` go to the CA for a connection (whose budget is `conn`)
/// of `peer`, or says which bound it would pass; see the module
/// documentation.
pub(crate) fn admit(
    conn: &Budget,
    peer: &Arc<Peer>,
    credential: &Credential,
    identity: Identity,
) -> Result<Admission, SecretError> {
    let new_identity = peer.new_identity(identity)?;
    let key = credential.sha256();
    let mut known = peer.known.lock();
    let pending = |known: &mut KnownState| {
        *known.pending.entry(key).or_insert(0) += 1;
        Some(PendingLogin {
            peer: peer.clone(),
            key,
        })
    };
    if known.proven.contains(&key) {
        return Ok(Admission {
            key,
            kind: Kind::Known,
            new_identity,
            _pending: None,
        });
    }
    if known.pending.contains_key(&key) {
        return Ok(Admission {
            key,
            kind: Kind::InFlight,
            new_identity,
            _pending: pending(&mut known),
        });
    }
    // Places first: a refusal for that reason spends no token.
    let places = [conn.place()?, peer.logins.place()?];
    let now = Instant::now();
    let mut conn_bucket = conn.token(now)?;
    let mut peer_bucket = peer.logins.token(now)?;
    conn_bucket.take(now);
    peer_bucket.take(now);
    Ok(Admission {
        key,
        kind: Kind::New(places),
        new_identity,
        _pending: pending(&mut known),
    })
}

/// A token bucket: `capacity` tokens, one more every `interval` (an
/// interval of zero means no rate limit).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: u32,
    capacity: u32,
    interval: Duration,
    /// When the next token is added (while below capacity).
    next: Instant,
}

impl TokenBucket {
    pub(crate) fn new(capacity: u32, interval: Duration) -> Self {
        Self {
            tokens: capacity,
            capacity,
            interval,
            next: Instant::now() + interval,
        }
    }

    /// Takes a token if there is one at `now`.
    #[cfg(test)]
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        if !self.ready(now) {
            return false;
        }
        self.take(now);
        true
    }

    /// Whether a token is there at `now` (adding those due).
    fn ready(&mut self, now: Instant) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        if self.tokens < self.capacity && now >= self.next {
            let periods = (now - self.next).as_nanos() / self.interval.as_nanos() + 1;
            let add = periods.min(u128::from(self.capacity - self.tokens)) as u32;
            self.tokens += add;
            self.next += self.interval * add;
        }
        self.tokens > 0
    }

    /// Takes the token [`Self::ready`] found.
    fn take(&mut self, now: Instant) {
        if self.interval.is_zero() {
            return;
        }
        if self.tokens == self.capacity {
            // Refill starts counting when the bucket stops being full.
            self.next = now + self.interval;
        }
        self.tokens -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_arithmetic() {
        let start = Instant::now();
        let mut b = TokenBucket::new(2, Duration::from_secs(5));
        assert!(b.try_take(start));
        assert!(b.try_take(start));
        assert!(!b.try_take(start + Duration::from_secs(4)));
        assert!(b.try_take(start + Duration::from_secs(5)));
        // Two periods later: two tokens (the burst), not three.
        assert!(b.try_take(start + Duration::from_secs(30)));
        assert!(b.try_take(start + Duration::from_secs(30)));
        assert!(!b.try_take(start + Duration::from_secs(30)));
    }
}

//! The cache: one entry per identity (SPIFFE ID + key type), each in an
//! explicit [`CertState`], and every change of state made under one lock.
//!
//! Because installs, forgets, evictions and new watchers all take the cache
//! lock and check the entry's state under it, a forgotten entry is never
//! installed into, never gains a watcher and is never rotated again; a
//! subscriber that raced a forget starts over with a fresh entry.
//!
//! Lock order: the cache lock, then an entry's own locks (its state, its
//! JWTs), then the trust bundle's. Nothing that holds a later lock takes an
//! earlier one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::watch;

use super::jwts::{JwtLease, Jwts};
use super::{IdentityState, SecretError, SecretWatch, WorkloadSecret};
use crate::crypto::KeyType;
use crate::identity::{Credential, SpiffeId};
use crate::trust::RootBundle;

/// What a cache entry is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CacheKey {
    pub identity: SpiffeId,
    pub key_type: KeyType,
}

/// Where an identity stands. Only the cache changes it, under its lock.
#[derive(Debug)]
pub(super) enum CertState {
    /// No certificate yet: subscribers are fetching the first one.
    Initializing,
    /// This certificate is served (past its expiry if renewals failed).
    Available(Arc<WorkloadSecret>),
    /// Out of the cache (evicted, no credential left, or its first fetch
    /// failed): nothing is installed into it again and its rotation ends.
    Forgotten,
}

/// One identity.
pub(super) struct Entry {
    pub key: CacheKey,
    guarded: Mutex<Guarded>,
    /// Held while a CA fetch for this identity runs, so that there is at
    /// most one; later first fetches wait on it.
    pub fetch: tokio::sync::Mutex<()>,
    /// What the identity's streams see.
    state: watch::Sender<IdentityState>,
    /// The JWTs of the identity's streams, for renewals.
    pub jwts: Mutex<Jwts>,
    /// How its renewals go, for the status page.
    progress: Mutex<Progress>,
}

/// How an identity's renewals go: shown on `/debug/identities`.
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
    /// When the next renewal is attempted.
    pub renew_at: Option<SystemTime>,
    /// The serial of the certificate served and when it falls due for
    /// renewal: the scheduled time, which failed attempts do not move.
    pub renewal_due: Option<(String, SystemTime)>,
    /// The last failure to issue or renew, until a certificate is installed.
    pub last_error: Option<String>,
}

struct Guarded {
    cert: CertState,
    /// Subscribers between [`Cache::reserve`] and the end of their subscribe.
    pending: usize,
}

impl Entry {
    fn guarded(&self) -> MutexGuard<'_, Guarded> {
        self.guarded.lock().expect("entry lock")
    }

    /// The certificate served, if any.
    pub fn current(&self) -> Option<Arc<WorkloadSecret>> {
        match &self.guarded().cert {
            CertState::Available(s) => Some(s.clone()),
            CertState::Initializing | CertState::Forgotten => None,
        }
    }

    pub fn is_forgotten(&self) -> bool {
        matches!(self.guarded().cert, CertState::Forgotten)
    }

    /// Open watches (one per stream or call being served).
    pub fn watchers(&self) -> usize {
        self.state.receiver_count()
    }

    pub fn jwts(&self) -> MutexGuard<'_, Jwts> {
        self.jwts.lock().expect("jwts lock")
    }

    fn progress_lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().expect("progress lock")
    }

    pub fn progress(&self) -> Progress {
        self.progress_lock().clone()
    }

    /// The certificate `serial` falls due for renewal at `at`, and the next
    /// renewal is attempted then.
    pub fn renews_at(&self, serial: &str, at: SystemTime) {
        let mut p = self.progress_lock();
        p.renew_at = Some(at);
        p.renewal_due = Some((serial.to_string(), at));
    }

    /// Issuing or renewing failed with `error`; the next attempt is at
    /// `retry_at`, if one is planned.
    pub fn failed(&self, error: &dyn std::fmt::Display, retry_at: Option<SystemTime>) {
        let mut p = self.progress_lock();
        p.last_error = Some(error.to_string());
        if retry_at.is_some() {
            p.renew_at = retry_at;
        }
    }
}

/// How an install went.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Installed {
    /// The identity's first certificate: its rotation must start.
    First,
    /// A newer certificate replaced the one served.
    Replaced,
}

/// The entry was forgotten: nothing was changed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Forgotten;

/// Why an entry is forgotten.
pub(super) enum Forget<'a> {
    /// Nobody watched it for the eviction period (refused while anyone does
    /// or is subscribing).
    Idle,
    /// No JWT of its streams can renew it: its streams end with this reason
    /// (refused if a live JWT arrived meanwhile).
    NoCredential(&'a str),
}

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub(super) struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    map: Mutex<HashMap<CacheKey, Arc<Entry>>>,
    /// `MAX_IDENTITIES`.
    max: usize,
    /// `MAX_JWTS_PER_IDENTITY`.
    max_jwts: usize,
}

impl Cache {
    pub fn new(max: usize, max_jwts: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                map: Mutex::new(HashMap::new()),
                max: max.max(1),
                max_jwts: max_jwts.max(1),
            }),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<CacheKey, Arc<Entry>>> {
        self.inner.map.lock().expect("cache lock")
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether `key` has an entry (being fetched, or cached).
    pub fn holds(&self, key: &CacheKey) -> bool {
        self.map().contains_key(key)
    }

    /// Every cached entry, now.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        self.map().values().cloned().collect()
    }

    /// Whether `key` is cached or would fit under `MAX_IDENTITIES`, taking
    /// nothing: checked before the CA is asked, so that a credential proven
    /// only to be refused for want of room costs no login.
    pub fn has_room_for(&self, key: &CacheKey) -> Result<(), SecretError> {
        let map = self.map();
        if map.contains_key(key) {
            return Ok(());
        }
        self.room_in(&map, key)
    }

    fn room_in(
        &self,
        map: &HashMap<CacheKey, Arc<Entry>>,
        key: &CacheKey,
    ) -> Result<(), SecretError> {
        if map.len() >= self.inner.max {
            return Err(SecretError::LimitReached {
                setting: "MAX_IDENTITIES",
                message: format!(
                    "this agent already serves {} identities (MAX_IDENTITIES); refusing a new one, {}",
                    map.len(),
                    key.identity
                ),
            });
        }
        Ok(())
    }

    /// The entry of `key`, made (`Initializing`) if there is none, with the
    /// caller counted as subscribing until the returned guard drops. A new
    /// identity past `MAX_IDENTITIES` is refused here, before the CA is asked.
    pub fn reserve(&self, key: &CacheKey, roots: Arc<RootBundle>) -> Result<Pending, SecretError> {
        let mut map = self.map();
        let entry = match map.get(key) {
            Some(e) => e.clone(),
            None => {
                self.room_in(&map, key)?;
                let entry = Arc::new(Entry {
                    key: key.clone(),
                    guarded: Mutex::new(Guarded {
                        cert: CertState::Initializing,
                        pending: 0,
                    }),
                    fetch: tokio::sync::Mutex::new(()),
                    state: watch::channel(IdentityState {
                        secret: None,
                        roots,
                        closed: None,
                    })
                    .0,
                    jwts: Mutex::new(Jwts::new(self.inner.max_jwts)),
                    progress: Mutex::default(),
                });
                map.insert(key.clone(), entry.clone());
                entry
            }
        };
        entry.guarded().pending += 1;
        Ok(Pending {
            cache: self.clone(),
            entry,
        })
    }

    /// Serves `secret` for `entry`, with `roots` (the bundle that already
    /// holds its root) in the same change, so each stream gets one push.
    pub fn install(
        &self,
        entry: &Entry,
        secret: Arc<WorkloadSecret>,
        roots: Arc<RootBundle>,
    ) -> Result<Installed, Forgotten> {
        let _map = self.map();
        let mut g = entry.guarded();
        let installed = match g.cert {
            CertState::Forgotten => return Err(Forgotten),
            CertState::Initializing => Installed::First,
            CertState::Available(_) => Installed::Replaced,
        };
        g.cert = CertState::Available(secret.clone());
        entry.progress_lock().last_error = None;
        entry.state.send_modify(|s| {
            s.secret = Some(secret);
            if roots.generation > s.roots.generation {
                s.roots = roots;
            }
        });
        Ok(installed)
    }

    /// A watch on `entry` for a subscriber whose credential was proven,
    /// and its JWT remembered for renewals. `None` if the entry was
    /// forgotten meanwhile. Also returns the JWTs this one displaced.
    pub fn attach(
        &self,
        entry: &Arc<Entry>,
        credential: &Credential,
    ) -> Option<(SecretWatch, JwtLease, Vec<Credential>)> {
        let _map = self.map();
        if entry.is_forgotten() {
            return None;
        }
        let (lease, displaced) = JwtLease::hold(entry, credential);
        Some((entry.state.subscribe(), lease, displaced))
    }

    /// Takes `entry` out of the cache (see [`Forget`] for when that is
    /// refused). Returns the JWTs it held, to be released, or `None` if
    /// nothing was done.
    pub fn forget(&self, entry: &Entry, why: Forget<'_>) -> Option<Vec<Credential>> {
        let mut map = self.map();
        let mut g = entry.guarded();
        let refused = match why {
            Forget::Idle => entry.watchers() > 0 || g.pending > 0,
            Forget::NoCredential(_) => entry.jwts().has_live(),
        };
        if refused || matches!(g.cert, CertState::Forgotten) {
            return None;
        }
        g.cert = CertState::Forgotten;
        drop(g);
        if map
            .get(&entry.key)
            .is_some_and(|e| std::ptr::eq(&**e, entry))
        {
            map.remove(&entry.key);
        }
        let reason = match why {
            Forget::NoCredential(reason) => Some(reason.to_string()),
            Forget::Idle => None,
        };
        // Streams still open see `closed` and end; the certificate goes with
        // the entry, and with it its hold on the trust bundle.
        entry.state.send_if_modified(|s| {
            s.secret = None;
            s.closed = reason.clone();
            reason.is_some()
        });
        Some(entry.jwts().take_all())
    }

    /// Gives every entry the newer trust bundle `roots`.
    pub fn publish_roots(&self, roots: &Arc<RootBundle>) {
        let entries: Vec<Arc<Entry>> = self.map().values().cloned().collect();
        for entry in entries {
            entry.state.send_if_modified(|s| {
                if roots.generation > s.roots.generation {
                    s.roots = roots.clone();
                    true
                } else {
                    false
                }
            });
        }
    }

    /// A subscriber is done with `entry`: if that leaves a first fetch
    /// nobody waits for any more (it failed, or the subscriber gave up),
    /// the entry leaves the cache.
    fn unreserve(&self, entry: &Entry) {
        let mut map = self.map();
        let mut g = entry.guarded();
        g.pending -= 1;
        if g.pending == 0 && matches!(g.cert, CertState::Initializing) && entry.watchers() == 0 {
            g.cert = CertState::Forgotten;
            if map
                .get(&entry.key)
                .is_some_and(|e| std::ptr::eq(&**e, entry))
            {
                map.remove(&entry.key);
            }
        }
    }
}

/// A subscriber's claim on an entry, from [`Cache::reserve`] to the end of
/// its subscribe (success, failure or cancellation alike).
pub(super) struct Pending {
    cache: Cache,
    entry: Arc<Entry>,
}

impl Pending {
    pub fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.cache.unreserve(&self.entry);
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;

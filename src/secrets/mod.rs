//! The secret manager: workload certificates cached per identity (SPIFFE ID +
//! key type), at most one fetch in flight per identity, renewed in the
//! background before expiry, and pushed through a watch channel to every open
//! SDS stream of that identity.
//!
//! - Every caller's own credential is proven to the CA (a login, cached by the
//!   CA client per distinct credential) before it is given anything.
//! - CA requests go through a bounded queue ([`queue`]) where first fetches
//!   pass background rotations.
//! - A renewal that fails keeps the current certificate served while it is
//!   valid and retries with per-identity back-off.
//! - An identity no stream has watched for the eviction period is dropped
//!   with its key, so memory is bounded by live identities.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::ca::{Authorization, CaClient, CaError};
use crate::crypto::{
    cert_not_after, verify_issued, CryptoError, IssuedChain, KeyType, LeafInfo, PrivateKey,
};
use crate::identity::{Credential, IdentityError, SpiffeId};

pub mod queue;
pub mod roots;
pub mod schedule;

use queue::{CaQueue, Priority};
use roots::{RootBundle, RootsWatch};
use schedule::RenewPolicy;

/// Why a workload could not be given its secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretError {
    /// The credential names no identity (not a JWT, no service account).
    #[error("invalid credential: {0}")]
    Credential(#[from] IdentityError),
    /// The CA refused the workload's credential.
    #[error("{0}")]
    Login(CaError),
    /// The CA could not sign for `identity`, or its answer was unusable.
    #[error("{error}")]
    Sign { identity: String, error: CaError },
    /// A bound of the agent was reached (`setting` names it); nothing was
    /// asked of the CA.
    #[error("{message}")]
    LimitReached {
        setting: &'static str,
        message: String,
    },
    /// The agent itself failed (key generation).
    #[error("{0}")]
    Internal(String),
}

impl SecretError {
    /// True when the CA was not asked: it refused this credential (or this
    /// token's sign) moments ago.
    pub fn is_repeat(&self) -> bool {
        match self {
            SecretError::Login(e) | SecretError::Sign { error: e, .. } => e.is_repeat(),
            _ => false,
        }
    }

    /// True when the failure is worth retrying soon (the CA was unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            SecretError::Login(e) | SecretError::Sign { error: e, .. } => e.is_transient(),
            _ => false,
        }
    }
}

/// A workload's key and certificate chain, as served to Envoy.
pub struct WorkloadSecret {
    pub identity: SpiffeId,
    pub key: PrivateKey,
    /// Leaf then the CA chain, PEM, concatenated.
    pub chain_pem: String,
    /// The roots this certificate chains to, with their expiry.
    pub roots: Vec<(String, SystemTime)>,
    pub leaf: LeafInfo,
    /// When the agent received it.
    pub received: SystemTime,
}

impl std::fmt::Debug for WorkloadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSecret")
            .field("identity", &self.identity)
            .field("serial", &self.leaf.serial_hex)
            .finish_non_exhaustive()
    }
}

impl WorkloadSecret {
    /// A version string for the `default` resource: changes with the certificate.
    pub fn cert_version(&self) -> String {
        self.leaf.serial_hex.replace(':', "")
    }
}

/// What streams of one identity watch.
#[derive(Debug, Clone, Default)]
pub struct IdentityState {
    /// The current secret; `None` until the first one is issued.
    pub secret: Option<Arc<WorkloadSecret>>,
    /// Set when the identity's streams must end (every JWT known for it has
    /// expired): the reason, sent to Envoy with `UNAVAILABLE`.
    pub closed: Option<String>,
}

/// The current state of one identity.
pub type SecretWatch = watch::Receiver<IdentityState>;

/// What a subscriber gets: the identity, its secret, and the trust bundle.
pub struct Subscription {
    pub identity: SpiffeId,
    pub secret: SecretWatch,
    pub roots: RootsWatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    identity: SpiffeId,
    key_type: KeyType,
}

struct Entry {
    key: CacheKey,
    /// Held while fetching: later callers wait on it instead of fetching again.
    fetch: tokio::sync::Mutex<()>,
    state: watch::Sender<IdentityState>,
    /// The newest JWT seen for this identity, for renewals.
    credential: Mutex<Option<Credential>>,
    rotating: AtomicBool,
}

impl Entry {
    fn current(&self) -> Option<Arc<WorkloadSecret>> {
        self.state.borrow().secret.clone()
    }

    /// Keeps the JWT that expires last (one without `exp` never expires).
    fn note_credential(&self, credential: &Credential) {
        let exp = |c: &Credential| {
            c.claims()
                .ok()
                .map(|c| c.expires_at.unwrap_or(i64::MAX))
                .unwrap_or(i64::MIN)
        };
        let mut cur = self.credential.lock().expect("credential lock");
        if cur.as_ref().is_none_or(|c| exp(credential) >= exp(c)) {
            *cur = Some(credential.clone());
        }
    }
}

/// How the manager behaves.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub trust_domain: String,
    pub key_type: KeyType,
    /// Requested certificate lifetime (`SECRET_TTL`).
    pub ttl: Duration,
    pub renew: RenewPolicy,
    /// Most CA requests in flight at once (`CA_MAX_CONCURRENCY`).
    pub max_concurrency: usize,
    /// How long an identity nobody watches stays cached (`SECRET_EVICTION_PERIOD`).
    pub eviction: Duration,
    /// Back-off of failed renewals.
    pub renew_backoff: (Duration, Duration),
}

impl ManagerOptions {
    pub fn new(trust_domain: impl Into<String>, key_type: KeyType, ttl: Duration) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            key_type,
            ttl,
            renew: RenewPolicy::default(),
            max_concurrency: 16,
            eviction: Duration::from_secs(3600),
            renew_backoff: (Duration::from_millis(500), Duration::from_secs(300)),
        }
    }
}

/// See the module documentation.
pub struct SecretManager {
    ca: Arc<dyn CaClient>,
    opts: ManagerOptions,
    entries: Mutex<HashMap<CacheKey, Arc<Entry>>>,
    roots: watch::Sender<Arc<RootBundle>>,
    /// Roots of the certificates in use: how many use each, and its expiry.
    root_refs: Mutex<HashMap<String, (usize, SystemTime)>>,
    queue: CaQueue,
}

impl SecretManager {
    pub fn new(ca: Arc<dyn CaClient>, opts: ManagerOptions) -> Arc<Self> {
        Arc::new(Self {
            ca,
            queue: CaQueue::new(opts.max_concurrency),
            opts,
            entries: Mutex::new(HashMap::new()),
            roots: watch::channel(Arc::new(RootBundle::default())).0,
            root_refs: Mutex::new(HashMap::new()),
        })
    }

    /// Identities currently cached.
    pub fn cached_identities(&self) -> usize {
        self.entries.lock().expect("cache lock").len()
    }

    /// The identity a credential names, without contacting the CA.
    pub fn identity_of(&self, credential: &Credential) -> Result<SpiffeId, SecretError> {
        Ok(credential
            .claims()?
            .service_account
            .spiffe_id(&self.opts.trust_domain))
    }

    /// Proves `credential` to the CA, makes sure its identity has a valid
    /// certificate, and returns watches on that identity's secret (already
    /// holding one when this returns `Ok`) and on the trust bundle.
    pub async fn subscribe(
        self: &Arc<Self>,
        credential: &Credential,
    ) -> Result<Subscription, SecretError> {
        let identity = self.identity_of(credential)?;
        let auth = {
            let _permit = self.queue.acquire(Priority::FirstFetch).await;
            self.ca
                .login(credential)
                .await
                .map_err(SecretError::Login)?
        };
        let (entry, rx) = self.entry(&identity);
        entry.note_credential(credential);
        if !usable(&entry.current()) {
            let _guard = entry.fetch.lock().await;
            // Another caller may have fetched while this one waited.
            if !usable(&entry.current()) {
                let secret = self.issue(&identity, &auth, Priority::FirstFetch).await?;
                tracing::info!(
                    identity = %identity,
                    serial = %secret.leaf.serial_hex,
                    expires = %rfc3339(secret.leaf.not_after),
                    "issued workload certificate"
                );
                self.install(&entry, secret);
            }
        }
        if !entry.rotating.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().rotate(entry.clone()));
        }
        Ok(Subscription {
            identity,
            secret: rx,
            roots: self.roots.subscribe(),
        })
    }

    /// The entry of `identity`, and a receiver made under the cache lock so
    /// that eviction (which also holds it) never drops a watched entry.
    fn entry(&self, identity: &SpiffeId) -> (Arc<Entry>, SecretWatch) {
        let key = CacheKey {
            identity: identity.clone(),
            key_type: self.opts.key_type,
        };
        let mut entries = self.entries.lock().expect("cache lock");
        let entry = entries
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    key,
                    fetch: tokio::sync::Mutex::new(()),
                    state: watch::channel(IdentityState::default()).0,
                    credential: Mutex::new(None),
                    rotating: AtomicBool::new(false),
                })
            })
            .clone();
        let rx = entry.state.subscribe();
        (entry, rx)
    }

    /// Publishes a new secret for `entry` and updates the trust bundle.
    fn install(&self, entry: &Entry, secret: WorkloadSecret) {
        let secret = Arc::new(secret);
        let old = entry.current();
        entry.state.send_modify(|s| s.secret = Some(secret.clone()));
        self.update_roots(old.as_deref(), Some(&secret));
    }

    /// Counts the roots of the certificates in use (adding `new`'s before
    /// dropping `old`'s, so a root both share stays) and pushes the trust
    /// bundle when it changed. O(roots), not O(identities).
    fn update_roots(&self, old: Option<&WorkloadSecret>, new: Option<&WorkloadSecret>) {
        let in_use: Vec<(String, SystemTime)> = {
            let mut refs = self.root_refs.lock().expect("roots lock");
            for (pem, exp) in new.iter().flat_map(|s| &s.roots) {
                refs.entry(pem.clone()).or_insert((0, *exp)).0 += 1;
            }
            for (pem, _) in old.iter().flat_map(|s| &s.roots) {
                if let Some(count) = refs.get_mut(pem) {
                    count.0 -= 1;
                    if count.0 == 0 {
                        refs.remove(pem);
                    }
                }
            }
            refs.iter()
                .map(|(pem, (_, exp))| (pem.clone(), *exp))
                .collect()
        };
        let bundle = RootBundle::from_in_use(&in_use, SystemTime::now());
        self.roots.send_if_modified(|cur| {
            if **cur == bundle || bundle.pems.is_empty() {
                return false;
            }
            tracing::info!(roots = bundle.pems.len(), version = %bundle.version(), "trust bundle (ROOTCA) changed");
            *cur = Arc::new(bundle);
            true
        });
    }

    /// Generates a key, has the CA sign a CSR for it, and checks the answer.
    async fn issue(
        &self,
        identity: &SpiffeId,
        auth: &Authorization,
        priority: Priority,
    ) -> Result<WorkloadSecret, SecretError> {
        let key_type = self.opts.key_type;
        let id = identity.clone();
        let (key, csr) = tokio::task::spawn_blocking(move || -> Result<_, CryptoError> {
            let key = PrivateKey::generate(key_type)?;
            let csr = key.csr_pem(&id)?;
            Ok((key, csr))
        })
        .await
        .map_err(|e| SecretError::Internal(format!("key generation task failed: {e}")))?
        .map_err(|e| SecretError::Internal(e.to_string()))?;

        let sign_err = |error| SecretError::Sign {
            identity: identity.to_string(),
            error,
        };
        let chain: IssuedChain = {
            let _permit = self.queue.acquire(priority).await;
            self.ca
                .sign(auth, &csr, self.opts.ttl)
                .await
                .map_err(sign_err)?
        };
        let leaf = verify_issued(&chain, &key.public_key_der(), identity, SystemTime::now())
            .map_err(|e| {
                let e =
                    CaError::bad_answer(format!("{} returned {e}; not served", self.ca.describe()));
                sign_err(e)
            })?;
        let roots = chain
            .roots_pem
            .iter()
            .map(|pem| (pem.clone(), cert_not_after(pem).unwrap_or(leaf.not_after)))
            .collect();
        Ok(WorkloadSecret {
            identity: identity.clone(),
            key,
            chain_pem: chain.chain_pem.concat(),
            roots,
            leaf,
            received: SystemTime::now(),
        })
    }

    /// The background life of one identity: renew at the scheduled time while
    /// someone watches, retry failures with back-off, and evict when nobody
    /// has watched for the eviction period.
    async fn rotate(self: Arc<Self>, entry: Arc<Entry>) {
        let id = entry.key.identity.clone();
        let tick =
            (self.opts.eviction / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
        let mut idle_since: Option<tokio::time::Instant> = None;
        let mut backoff = Backoff::new(self.opts.renew_backoff.0, self.opts.renew_backoff.1);
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut expired_logged = false;
        let mut schedule: Option<(String, SystemTime)> = None;
        loop {
            let Some(secret) = entry.current() else {
                return;
            };
            // Drawn once per certificate, so that the jitter holds still.
            let renew_at = match &schedule {
                Some((serial, at)) if *serial == secret.leaf.serial_hex => *at,
                _ => {
                    let start = secret.leaf.not_before.max(secret.received);
                    let at = self
                        .opts
                        .renew
                        .renew_at(start, secret.leaf.not_after, rand::random());
                    tracing::debug!(identity = %id, renew_at = %rfc3339(at), "renewal scheduled");
                    schedule = Some((secret.leaf.serial_hex.clone(), at));
                    at
                }
            };
            let due = retry_at.unwrap_or_else(|| to_instant(renew_at));
            let now = tokio::time::Instant::now();
            if now < due {
                tokio::time::sleep(due.saturating_duration_since(now).min(tick)).await;
            }
            // Eviction: nobody watched for the whole period.
            if entry.state.receiver_count() == 0 {
                let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= self.opts.eviction && self.evict(&entry) {
                    return;
                }
                // Nobody to renew for: wait for a watcher or the eviction.
                if tokio::time::Instant::now() >= due {
                    tokio::time::sleep(tick).await;
                }
                continue;
            }
            idle_since = None;
            if tokio::time::Instant::now() < due {
                continue;
            }
            // Renew under the fetch lock, so a first fetch of this identity
            // (its certificate having expired meanwhile) waits for it.
            let guard = entry.fetch.lock().await;
            if entry.current().map(|s| s.leaf.serial_hex.clone())
                != Some(secret.leaf.serial_hex.clone())
            {
                // Someone else installed a new certificate meanwhile.
                retry_at = None;
                continue;
            }
            let result = self.renew(&entry).await.map(|new| {
                tracing::info!(
                    identity = %id,
                    serial = %new.leaf.serial_hex,
                    expires = %rfc3339(new.leaf.not_after),
                    "renewed workload certificate; pushing it to every stream of this identity"
                );
                self.install(&entry, new);
            });
            drop(guard);
            match result {
                Ok(()) => {
                    backoff.reset();
                    retry_at = None;
                    expired_logged = false;
                }
                Err(RenewError::NoCredential(reason)) => {
                    tracing::warn!(identity = %id, "{reason}");
                    entry.state.send_modify(|s| s.closed = Some(reason));
                    self.forget(&entry);
                    return;
                }
                Err(RenewError::Failed(e)) => {
                    // Never sleep past half of what is left of the current
                    // certificate, nor more than 10 s once it has expired.
                    let left = secret
                        .leaf
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let valid = !left.is_zero();
                    let limit = if valid {
                        (left / 2).max(Duration::from_secs(1))
                    } else {
                        EXPIRED_RETRY
                    };
                    let delay = backoff.next_delay().min(limit);
                    retry_at = Some(tokio::time::Instant::now() + delay);
                    if valid {
                        tracing::error!(
                            identity = %id,
                            "failed to renew the certificate: {e}; still serving the current one (valid until {}), retrying in {:.1}s",
                            rfc3339(secret.leaf.not_after),
                            delay.as_secs_f64()
                        );
                    } else {
                        if !expired_logged {
                            tracing::error!(
                                identity = %id,
                                "certificate expired at {} without renewal; Envoy holds an expired certificate until the CA answers",
                                rfc3339(secret.leaf.not_after)
                            );
                            expired_logged = true;
                        }
                        tracing::error!(identity = %id, "failed to renew the certificate: {e}; retrying in {:.1}s", delay.as_secs_f64());
                    }
                }
            }
        }
    }

    /// One renewal attempt with the cached Vault token, else the newest JWT.
    async fn renew(&self, entry: &Entry) -> Result<WorkloadSecret, RenewError> {
        let credential = entry.credential.lock().expect("credential lock").clone();
        let Some(credential) = credential else {
            return Err(RenewError::NoCredential(format!(
                "no credential known for {}; ending its streams so that Envoy reconnects",
                entry.key.identity
            )));
        };
        let auth = {
            let _permit = self.queue.acquire(Priority::Rotation).await;
            match self.ca.cached_login(&credential).await {
                Some(auth) => auth,
                None => {
                    let expired = credential
                        .claims()
                        .ok()
                        .and_then(|c| c.expires_at)
                        .is_some_and(|exp| exp <= unix_now());
                    if expired {
                        return Err(RenewError::NoCredential(format!(
                            "every JWT known for {} has expired and the CA token is gone: cannot renew; ending its \
                             streams with UNAVAILABLE so that Envoy reconnects with its refreshed token",
                            entry.key.identity
                        )));
                    }
                    self.ca
                        .login(&credential)
                        .await
                        .map_err(|e| RenewError::Failed(SecretError::Login(e)))?
                }
            }
        };
        self.issue(&entry.key.identity, &auth, Priority::Rotation)
            .await
            .map_err(RenewError::Failed)
    }

    /// Drops `entry` if still nobody watches it. Returns whether it was dropped.
    fn evict(&self, entry: &Arc<Entry>) -> bool {
        {
            let entries = self.entries.lock().expect("cache lock");
            if entry.state.receiver_count() > 0 {
                return false;
            }
            self.forget_locked(entries, entry);
        }
        tracing::info!(identity = %entry.key.identity, "evicted idle identity and its key from the cache");
        true
    }

    /// Drops `entry` whether or not it is watched (its streams are ending).
    fn forget(&self, entry: &Arc<Entry>) {
        self.forget_locked(self.entries.lock().expect("cache lock"), entry);
    }

    fn forget_locked(
        &self,
        mut entries: std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<Entry>>>,
        entry: &Arc<Entry>,
    ) {
        if entries
            .get(&entry.key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            entries.remove(&entry.key);
        }
        drop(entries);
        self.update_roots(entry.current().as_deref(), None);
    }
}

/// Longest wait between renewal attempts once the certificate has expired.
const EXPIRED_RETRY: Duration = Duration::from_secs(10);

enum RenewError {
    /// No usable credential: the identity's streams are ended.
    NoCredential(String),
    /// The CA failed; retried with back-off.
    Failed(SecretError),
}

/// A cached secret may be handed out while it is still valid.
fn usable(current: &Option<Arc<WorkloadSecret>>) -> bool {
    current
        .as_ref()
        .is_some_and(|s| s.leaf.not_after > SystemTime::now() + Duration::from_secs(1))
}

use crate::identity::unix_now;

fn to_instant(t: SystemTime) -> tokio::time::Instant {
    let now = SystemTime::now();
    let delta = t.duration_since(now).unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + delta
}

/// RFC 3339 for log lines.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|dt| {
            dt.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs}s since epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::local::LocalCa;
    use async_trait::async_trait;
    use std::sync::atomic::AtomicUsize;

    /// Two local CAs; `switch` makes the second one sign from then on.
    struct TwoRoots {
        cas: [LocalCa; 2],
        current: AtomicUsize,
    }

    #[async_trait]
    impl CaClient for TwoRoots {
        fn describe(&self) -> String {
            "two roots".into()
        }
        async fn login(&self, _: &Credential) -> Result<Authorization, CaError> {
            Ok(Authorization::default())
        }
        async fn cached_login(&self, _: &Credential) -> Option<Authorization> {
            Some(Authorization::default())
        }
        async fn sign(
            &self,
            auth: &Authorization,
            csr: &str,
            ttl: Duration,
        ) -> Result<IssuedChain, CaError> {
            self.cas[self.current.load(Ordering::SeqCst)]
                .sign(auth, csr, ttl)
                .await
        }
        async fn trust_roots(&self) -> Result<Vec<String>, CaError> {
            self.cas[self.current.load(Ordering::SeqCst)]
                .trust_roots()
                .await
        }
        fn invalidate(&self, _: &Authorization) {}
        async fn release(&self, _: &Credential) {}
        async fn shutdown(&self) {}
    }

    fn jwt(sa: &str) -> Credential {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        Credential::new(format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"none"}"#),
            b64(&format!(r#"{{"sub":"system:serviceaccount:ns:{sa}"}}"#))
        ))
    }

    #[tokio::test]
    async fn the_trust_bundle_holds_both_roots_until_no_certificate_uses_the_old() {
        let ca = Arc::new(TwoRoots {
            cas: [
                LocalCa::new(None, "td").unwrap(),
                LocalCa::new(None, "td").unwrap(),
            ],
            current: AtomicUsize::new(0),
        });
        let roots = |i: usize| ca.cas[i].root_pem().to_string();
        let m = SecretManager::new(
            ca.clone(),
            ManagerOptions::new("td", KeyType::EcP256, Duration::from_secs(3600)),
        );
        let a = m.subscribe(&jwt("a")).await.unwrap();
        let b = m.subscribe(&jwt("b")).await.unwrap();
        assert_eq!(a.roots.borrow().pems, [roots(0)]);

        // The CA's root changes; `a` renews first.
        ca.current.store(1, Ordering::SeqCst);
        let renew = |id: &SpiffeId| {
            let m = m.clone();
            let id = id.clone();
            async move {
                let (entry, _rx) = m.entry(&id);
                let new = m
                    .issue(&id, &Authorization::default(), Priority::Rotation)
                    .await
                    .unwrap();
                m.install(&entry, new);
            }
        };
        renew(&a.identity).await;
        let both = a.roots.borrow().pems.clone();
        assert_eq!(
            both.len(),
            2,
            "old and new root while `b` still uses the old one"
        );
        assert!(both.contains(&roots(0)) && both.contains(&roots(1)));
        renew(&b.identity).await;
        assert_eq!(
            b.roots.borrow().pems,
            [roots(1)],
            "the old root leaves with its last certificate"
        );

        // Forgetting an identity drops only what no other certificate uses.
        let (entry, _rx) = m.entry(&a.identity);
        m.forget(&entry);
        assert_eq!(b.roots.borrow().pems, [roots(1)]);
        assert_eq!(m.cached_identities(), 1);
    }
}

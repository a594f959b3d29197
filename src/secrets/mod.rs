//! The secret manager: workload certificates cached per identity (SPIFFE ID +
//! key type), at most one CA fetch in flight per identity, renewed in the
//! background before expiry, and pushed with the trust bundle, as one
//! change, to every open SDS stream of that identity.
//!
//! Each concern has its own file:
//! - [`cache`]: the entries, their explicit state, and every transition
//!   under one lock (a forgotten entry is never installed into or rotated);
//! - [`issue`]: keys, signing, the checks of every answer, first fetches;
//! - [`rotation`] and [`renew`]: the renewal schedule and one renewal;
//! - [`jwts`]: the bounded JWTs of an identity's live streams;
//! - [`eviction`]: identities nobody watches leave, their tokens released;
//! - [`schedule`]: when a certificate is renewed;
//! - `svid_warnings`: the warning about leaves that break X.509-SVID rules;
//! - `report`: what the status server and the metrics read of the cache.
//!
//! Every CA request waits in the bounded CA queue
//! ([`crate::ca::queue`]), first fetches ahead of renewals (which keep a
//! reserved share and age, so they are never starved); the trust
//! bundle's reads of the CA's roots wait in the same one.
//!
//! The trust bundle (`ROOTCA`) is [`crate::trust`]; the manager only
//! registers the roots of the certificates it installs and forwards the
//! bundle.
//!
//! Every caller's own credential is proven to the CA (a login, or a login
//! the CA client has cached for that very JWT) before it is given anything.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::ca::queue::{CaQueue, Priority};
use crate::ca::{CaClient, CaError};
pub use crate::clock::rfc3339;
use crate::clock::Clock;
use crate::crypto::{KeyType, LeafInfo, PrivateKey};
use crate::identity::{Credential, IdentityError, SpiffeId};
use crate::memo::Memo;
use crate::metrics::Refusal;
use crate::trust::{RootBundle, RootsInUse, TrustBundle};

mod cache;
mod eviction;
mod issue;
mod jwts;
mod renew;
mod report;
mod rotation;
pub mod schedule;
mod svid_warnings;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

use cache::{Cache, CacheKey};
use issue::FetchError;
use jwts::JwtLease;
pub use jwts::Standing;
use schedule::RenewPolicy;
use svid_warnings::SvidWarnings;

/// Why a workload could not be given its secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SecretError {
    /// The credential names no identity (not a JWT, no service account), or
    /// has expired.
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

    /// Why this error refuses a request, as the metrics count it. Transient
    /// CA failures do not refuse (the stream waits), but are mapped too.
    pub fn refusal(&self) -> Refusal {
        match self {
            SecretError::Credential(_) => Refusal::Credential,
            SecretError::Login(err) | SecretError::Sign { error: err, .. } => {
                if err.is_rejection() {
                    Refusal::Rejected
                } else {
                    Refusal::Failure
                }
            }
            SecretError::LimitReached { .. } => Refusal::Limits,
            SecretError::Internal(_) => Refusal::Failure,
        }
    }

    /// True when the CA refused the token a sign was made with (revoked,
    /// expired, its policy changed): a new login may help.
    fn is_token_refused(&self) -> bool {
        matches!(self, SecretError::Sign { error, .. } if error.is_token_refused())
    }
}

/// A workload's key and certificate chain, as served to Envoy.
pub struct WorkloadSecret {
    pub identity: SpiffeId,
    pub key: PrivateKey,
    /// Leaf then the CA chain, PEM, concatenated.
    pub chain_pem: String,
    pub leaf: LeafInfo,
    /// When the agent received it.
    pub received: SystemTime,
    /// Keeps the roots of its chain in the trust bundle while it is in use.
    roots: RootsInUse,
    /// Its version, and its `default` resource as SDS encodes it.
    pub(crate) memo: SecretMemo,
}

/// What is derived from a [`WorkloadSecret`], made at its first use.
#[derive(Debug, Default)]
pub(crate) struct SecretMemo {
    version: Memo<String>,
    pub sds: Memo<Arc<crate::sds::encoded::Encoded>>,
}

impl std::fmt::Debug for WorkloadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSecret")
            .field("identity", &self.identity)
            .field("serial", &self.leaf.serial_hex)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl WorkloadSecret {
    /// A version string for the `default` resource: changes with the certificate.
    pub fn cert_version(&self) -> String {
        self.version().to_string()
    }

    /// [`WorkloadSecret::cert_version`], borrowed.
    pub fn version(&self) -> &str {
        self.memo
            .version
            .get_or_init(|| self.leaf.serial_hex.replace(':', ""))
    }
}

/// What the streams of one identity watch. The certificate and the trust
/// bundle change together: a renewal onto a new root is one change, pushed
/// once.
#[derive(Debug, Clone, Default)]
pub struct IdentityState {
    /// The current secret; `None` until the first one is issued.
    pub secret: Option<Arc<WorkloadSecret>>,
    /// The trust bundle (`ROOTCA`).
    pub roots: Arc<RootBundle>,
    /// Set when the identity's streams must end (no JWT of its streams can
    /// renew it): the reason, sent to Envoy with `UNAVAILABLE`.
    pub closed: Option<String>,
}

/// The current state of one identity.
pub type SecretWatch = watch::Receiver<IdentityState>;

/// What a subscriber gets: the identity and a watch on its state. Hold it
/// while the stream lives: it keeps the stream's JWT among those the
/// identity is renewed with.
#[derive(Debug)]
pub struct Subscription {
    pub identity: SpiffeId,
    pub secret: SecretWatch,
    jwt: JwtLease,
}

impl Subscription {
    /// True once the CA has rejected, at a renewal of the identity, the JWT
    /// this subscription was made with: the stream no longer proves the
    /// identity and should end (`PERMISSION_DENIED`), though the identity
    /// may still be renewed with other streams' JWTs.
    pub fn credential_rejected(&self) -> bool {
        self.jwt.standing() == Standing::Rejected
    }

    /// Where this stream stands with the certificate its identity serves
    /// now: its JWT proven for it, rejected by the CA, or not proven at the
    /// last renewal (see [`jwts`]).
    pub fn standing(&self) -> Standing {
        self.jwt.standing()
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
    /// Most CA requests in flight at once (`CA_MAX_CONCURRENCY`): the size
    /// of the manager's own CA queue when [`ManagerOptions::queue`] is `None`.
    pub max_concurrency: usize,
    /// The CA queue every CA request waits in, shared with the trust
    /// bundle's reads of the CA's roots; `None`: a queue of
    /// `max_concurrency` of the manager's own.
    pub queue: Option<CaQueue>,
    /// How long an identity nobody watches stays cached (`SECRET_EVICTION_PERIOD`).
    pub eviction: Duration,
    /// Back-off of failed renewals (first step, cap).
    pub renew_backoff: (Duration, Duration),
    /// Most identities cached (`MAX_IDENTITIES`).
    pub max_identities: usize,
    /// Most JWTs remembered per identity (`MAX_JWTS_PER_IDENTITY`).
    pub max_jwts_per_identity: usize,
    pub clock: Clock,
}

/// Default of `MAX_IDENTITIES`.
pub const DEFAULT_MAX_IDENTITIES: usize = 1024;
/// Default of `MAX_JWTS_PER_IDENTITY`.
pub const DEFAULT_MAX_JWTS_PER_IDENTITY: usize = 8;

impl ManagerOptions {
    pub fn new(trust_domain: impl Into<String>, key_type: KeyType, ttl: Duration) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            key_type,
            ttl,
            renew: RenewPolicy::default(),
            max_concurrency: 16,
            queue: None,
            eviction: Duration::from_secs(3600),
            renew_backoff: (Duration::from_millis(500), Duration::from_secs(300)),
            max_identities: DEFAULT_MAX_IDENTITIES,
            max_jwts_per_identity: DEFAULT_MAX_JWTS_PER_IDENTITY,
            clock: Clock::system(),
        }
    }
}

/// See the module documentation.
pub struct SecretManager {
    ca: Arc<dyn CaClient>,
    opts: ManagerOptions,
    cache: Cache,
    trust: Arc<TrustBundle>,
    queue: CaQueue,
    svid_warnings: SvidWarnings,
}

/// How often a subscribe starts over because its entry was forgotten under
/// it (each time by a decision made since it began) before giving up.
const SUBSCRIBE_ATTEMPTS: usize = 3;

impl SecretManager {
    /// A manager whose certificates come from `ca` and whose `ROOTCA` is `trust`.
    pub fn new(ca: Arc<dyn CaClient>, trust: Arc<TrustBundle>, opts: ManagerOptions) -> Arc<Self> {
        let queue = opts
            .queue
            .clone()
            .unwrap_or_else(|| CaQueue::new(opts.max_concurrency));
        let manager = Arc::new(Self {
            ca,
            queue,
            cache: Cache::new(opts.max_identities, opts.max_jwts_per_identity),
            trust,
            opts,
            svid_warnings: SvidWarnings::default(),
        });
        // Every change of the trust bundle reaches every identity's streams.
        // O(identities) per change; the bundle changes rarely (a rotation).
        let mut roots = manager.trust.subscribe();
        let cache = manager.cache.clone();
        tokio::spawn(async move {
            while roots.changed().await.is_ok() {
                let bundle = roots.borrow_and_update().clone();
                cache.publish_roots(&bundle);
            }
        });
        manager
    }

    /// The clock every decision of the manager reads (JWT expiry,
    /// certificate validity, renewals): for the streams' own checks of
    /// their credentials, so that they read the same time.
    pub fn clock(&self) -> Clock {
        self.opts.clock
    }

    /// Identities currently cached.
    pub fn cached_identities(&self) -> usize {
        self.cache.len()
    }

    /// Every cached identity as the status page shows it: its certificate's
    /// serial and expiry, its next renewal, its streams and its last error;
    /// never its key or a credential.
    pub fn identities(&self) -> Vec<crate::metrics::IdentityReport> {
        self.cache
            .entries()
            .iter()
            .map(|e| {
                let cert = e.current();
                let progress = e.progress();
                // The schedule of the certificate served, not of one it replaced.
                let renewal_due = match (&cert, progress.renewal_due) {
                    (Some(c), Some((serial, at))) if serial == c.leaf.serial_hex => Some(at),
                    _ => None,
                };
                crate::metrics::IdentityReport {
                    identity: e.key.identity.to_string(),
                    key_type: e.key.key_type.to_string(),
                    serial: cert.as_ref().map(|c| c.leaf.serial_hex.clone()),
                    not_after: cert.as_ref().map(|c| c.leaf.not_after),
                    renew_at: cert.and(progress.renew_at),
                    renewal_due,
                    streams_open: e.watchers(),
                    last_error: progress.last_error,
                }
            })
            .collect()
    }

    /// CA requests waiting for a slot of the CA queue (`CA_MAX_CONCURRENCY`).
    pub fn ca_queue_depth(&self) -> usize {
        self.queue.waiting()
    }

    /// The identity an unexpired credential names, without contacting the CA.
    pub fn identity_of(&self, credential: &Credential) -> Result<SpiffeId, SecretError> {
        Ok(credential.spiffe_id_by(&self.opts.trust_domain, &self.opts.clock)?)
    }

    /// Whether `identity` is in the cache (or being fetched): a first fetch
    /// of it would not add an identity.
    pub fn is_cached(&self, identity: &SpiffeId) -> bool {
        self.cache.holds(&CacheKey {
            identity: identity.clone(),
            key_type: self.opts.key_type,
        })
    }

    /// Proves `credential` to the CA, makes sure its identity has a valid
    /// certificate, and returns a watch on that identity's state (already
    /// holding a certificate when this returns `Ok`).
    ///
    /// Cancel-safe: a subscriber that gives up leaves nothing behind (a
    /// first fetch nobody waits for any more leaves the cache).
    pub async fn subscribe(
        self: &Arc<Self>,
        credential: &Credential,
    ) -> Result<Subscription, SecretError> {
        let identity = self.identity_of(credential)?;
        let key = CacheKey {
            identity: identity.clone(),
            key_type: self.opts.key_type,
        };
        // The JWT is proven before it may take a place under
        // `MAX_IDENTITIES`: a forged one never holds an identity slot. When
        // there is no room, the CA is not asked at all.
        self.cache.has_room_for(&key)?;
        let auth = self.login(credential).await?;
        for _ in 0..SUBSCRIBE_ATTEMPTS {
            let pending = self.cache.reserve(&key, self.trust.current())?;
            match self
                .first_fetch(pending.entry(), credential, auth.clone())
                .await
            {
                Ok(()) => {}
                Err(FetchError::Forgotten) => continue,
                Err(FetchError::Failed(e)) => {
                    pending.entry().failed(&e, None);
                    return Err(e);
                }
            }
            let Some((secret, lease, displaced)) = self.cache.attach(pending.entry(), credential)
            else {
                continue;
            };
            self.release(displaced);
            return Ok(Subscription {
                identity,
                secret,
                jwt: lease,
            });
        }
        Err(SecretError::Internal(format!(
            "{identity} was forgotten {SUBSCRIBE_ATTEMPTS} times while being fetched; try again"
        )))
    }

    /// The CA's authorization for `credential`: the cached login (which
    /// takes no place in the CA queue), else a new login, which waits in the
    /// first-fetch line.
    async fn login(
        &self,
        credential: &Credential,
    ) -> Result<crate::ca::Authorization, SecretError> {
        if let Some(auth) = self.ca.cached_login(credential).await {
            return Ok(auth);
        }
        let _permit = self.queue.acquire(Priority::FirstFetch).await;
        self.ca.login(credential).await.map_err(SecretError::Login)
    }
}

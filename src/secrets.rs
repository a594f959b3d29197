//! The secret manager: workload certificates cached per identity (SPIFFE ID +
//! key type), at most one fetch in flight per identity, and a watch channel per
//! identity through which every open SDS stream of that identity is pushed a
//! new secret.
//!
//! Every caller's own credential is proven to the CA (a login, cached by the CA
//! client per distinct credential) before it is given anything from the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::ca::{CaClient, CaError};
use crate::crypto::{verify_issued, CryptoError, IssuedChain, KeyType, LeafInfo, PrivateKey};
use crate::identity::{Credential, IdentityError, SpiffeId};

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
    /// The agent itself failed (key generation).
    #[error("{0}")]
    Internal(String),
}

impl SecretError {
    /// True when the failure is worth retrying soon (the CA was unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            SecretError::Login(e) | SecretError::Sign { error: e, .. } => e.is_transient(),
            _ => false,
        }
    }
}

/// A workload's key, certificate chain and trusted roots, as served to Envoy.
pub struct WorkloadSecret {
    pub identity: SpiffeId,
    pub key: PrivateKey,
    /// Leaf then intermediates, PEM, concatenated.
    pub chain_pem: String,
    /// The trusted root bundle, PEM, concatenated.
    pub roots_pem: String,
    pub leaf: LeafInfo,
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

    /// A version string for `ROOTCA`: changes only with the root bundle.
    pub fn roots_version(&self) -> String {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(self.roots_pem.as_bytes());
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The current secret of one identity; `None` until the first one is issued.
pub type SecretWatch = watch::Receiver<Option<Arc<WorkloadSecret>>>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    identity: SpiffeId,
    key_type: KeyType,
}

struct Entry {
    /// Held while fetching: later callers wait on it instead of fetching again.
    fetch: tokio::sync::Mutex<()>,
    current: watch::Sender<Option<Arc<WorkloadSecret>>>,
}

/// Counters, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub signs: AtomicU64,
    pub logins: AtomicU64,
}

/// See the module documentation.
pub struct SecretManager {
    ca: Arc<dyn CaClient>,
    trust_domain: String,
    key_type: KeyType,
    ttl: Duration,
    entries: Mutex<HashMap<CacheKey, Arc<Entry>>>,
    pub stats: Stats,
}

impl SecretManager {
    pub fn new(
        ca: Arc<dyn CaClient>,
        trust_domain: String,
        key_type: KeyType,
        ttl: Duration,
    ) -> Self {
        Self {
            ca,
            trust_domain,
            key_type,
            ttl,
            entries: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The identity a credential names, without contacting the CA.
    pub fn identity_of(&self, credential: &Credential) -> Result<SpiffeId, SecretError> {
        Ok(credential
            .claims()?
            .service_account
            .spiffe_id(&self.trust_domain))
    }

    /// Proves `credential` to the CA, makes sure its identity has a valid
    /// certificate, and returns a watch on that identity's secret (already
    /// holding a value when this returns `Ok`).
    pub async fn subscribe(
        &self,
        credential: &Credential,
    ) -> Result<(SpiffeId, SecretWatch), SecretError> {
        let identity = self.identity_of(credential)?;
        self.stats.logins.fetch_add(1, Ordering::Relaxed);
        let auth = self
            .ca
            .login(credential)
            .await
            .map_err(SecretError::Login)?;
        let entry = self.entry(&identity);
        if !usable(&entry.current.borrow()) {
            let _guard = entry.fetch.lock().await;
            // Another caller may have fetched while this one waited.
            if !usable(&entry.current.borrow()) {
                let secret = self.issue(&identity, &auth).await?;
                tracing::info!(
                    identity = %identity,
                    serial = %secret.leaf.serial_hex,
                    expires = %humantime_rfc3339(secret.leaf.not_after),
                    "issued workload certificate"
                );
                entry.current.send_replace(Some(Arc::new(secret)));
            }
        }
        Ok((identity, entry.current.subscribe()))
    }

    fn entry(&self, identity: &SpiffeId) -> Arc<Entry> {
        let key = CacheKey {
            identity: identity.clone(),
            key_type: self.key_type,
        };
        let mut entries = self.entries.lock().expect("secret cache lock poisoned");
        entries
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Entry {
                    fetch: tokio::sync::Mutex::new(()),
                    current: watch::channel(None).0,
                })
            })
            .clone()
    }

    /// Generates a key, has the CA sign a CSR for it, and checks the answer.
    async fn issue(
        &self,
        identity: &SpiffeId,
        auth: &crate::ca::Authorization,
    ) -> Result<WorkloadSecret, SecretError> {
        let key_type = self.key_type;
        let id = identity.clone();
        let (key, csr) = tokio::task::spawn_blocking(move || -> Result<_, CryptoError> {
            let key = PrivateKey::generate(key_type)?;
            let csr = key.csr_pem(&id)?;
            Ok((key, csr))
        })
        .await
        .map_err(|e| SecretError::Internal(format!("key generation task failed: {e}")))?
        .map_err(|e| SecretError::Internal(e.to_string()))?;

        self.stats.signs.fetch_add(1, Ordering::Relaxed);
        let sign_err = |error| SecretError::Sign {
            identity: identity.to_string(),
            error,
        };
        let chain: IssuedChain = self.ca.sign(auth, &csr, self.ttl).await.map_err(sign_err)?;
        let leaf = verify_issued(&chain, &key.public_key_der(), identity, SystemTime::now())
            .map_err(|e| {
                sign_err(CaError::BadAnswer(format!(
                    "{} returned {e}",
                    self.ca.describe()
                )))
            })?;
        Ok(WorkloadSecret {
            identity: identity.clone(),
            key,
            chain_pem: chain.chain_pem.concat(),
            roots_pem: chain.roots_pem.concat(),
            leaf,
        })
    }
}

/// A cached secret may be handed out while it is still valid.
fn usable(current: &Option<Arc<WorkloadSecret>>) -> bool {
    current
        .as_ref()
        .is_some_and(|s| s.leaf.not_after > SystemTime::now() + Duration::from_secs(1))
}

/// RFC 3339 for log lines, without pulling in another crate.
pub fn humantime_rfc3339(t: SystemTime) -> String {
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

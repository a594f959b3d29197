//! From a workload's credential (its Kubernetes service-account JWT) to the
//! SPIFFE ID its certificate carries.
//!
//! The agent does not verify the JWT's signature: it cannot (it has no
//! Kubernetes key) and need not, because the CA verifies it at login (Vault's
//! kubernetes or jwt auth method). The agent only reads which identity the
//! token claims, to key its cache and to build the CSR.

use std::fmt;
use std::sync::OnceLock;

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::clock::Clock;

/// Why a credential does not name an identity.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the credential is not a JWT (expected three base64url parts separated by '.')")]
    NotAJwt,
    #[error("the JWT payload is not base64url-encoded JSON")]
    BadPayload,
    #[error("the JWT names no Kubernetes service account (no 'sub' of the form system:serviceaccount:<namespace>:<name> and no 'kubernetes.io' claim)")]
    NoServiceAccount,
    #[error("the JWT's service account {0:?} has characters not allowed in a SPIFFE ID")]
    BadName(String),
    /// The JWT's `exp` has passed: it proves nothing any more, whatever the CA
    /// said about it before.
    #[error("the JWT expired at {exp} (Unix time); the workload must present its refreshed token")]
    Expired { exp: i64 },
}

/// A workload's JWT. Its text never appears in `Debug` output or logs.
/// Clones share the text (a JWT is ~1 KiB, and every stream, cache entry and
/// login slot of an identity holds one), which is wiped when the last goes.
///
/// What is read from the text (its claims, its digest) is computed once per
/// credential and shared by its clones: a request's checks read the claims
/// several times (expiry, identity, JWT bookkeeping), and parsing them was a
/// tenth of a cached `FetchSecrets`. Only the pure functions of the text are
/// kept; whether the token has expired is decided against the clock at each
/// call, by the agent's clock ([`Credential::current_claims_by`]).
#[derive(Clone)]
pub struct Credential {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    jwt: Zeroizing<String>,
    claims: OnceLock<Result<Claims, IdentityError>>,
    sha256: OnceLock<[u8; 32]>,
    /// The SPIFFE ID its claims name, with the trust domain it was made in.
    spiffe_id: OnceLock<(String, SpiffeId)>,
}

impl Credential {
    pub fn new(jwt: impl Into<String>) -> Self {
        let mut jwt = Zeroizing::new(jwt.into());
        let trimmed = jwt.trim();
        if trimmed.len() != jwt.len() {
            jwt = Zeroizing::new(trimmed.to_string());
        }
        Self {
            inner: std::sync::Arc::new(Inner {
                jwt,
                claims: OnceLock::new(),
                sha256: OnceLock::new(),
                spiffe_id: OnceLock::new(),
            }),
        }
    }

    /// The raw token, for sending to the CA only.
    pub fn expose(&self) -> &str {
        self.inner.jwt.as_str()
    }

    /// SHA-256 of the token (keys of the maps that remember tokens).
    pub fn sha256(&self) -> [u8; 32] {
        *self
            .inner
            .sha256
            .get_or_init(|| Sha256::digest(self.inner.jwt.as_bytes()).into())
    }

    /// A stable, non-reversible handle for this exact token (cache keys, logs).
    pub fn fingerprint(&self) -> String {
        self.sha256()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The claims the agent reads from the token.
    pub fn claims(&self) -> Result<Claims, IdentityError> {
        self.parsed().clone()
    }

    fn parsed(&self) -> &Result<Claims, IdentityError> {
        self.inner
            .claims
            .get_or_init(|| parse_claims(&self.inner.jwt))
    }

    /// The token's `exp`, if it is a readable JWT that has one.
    pub fn expires_at(&self) -> Option<i64> {
        match self.parsed() {
            Ok(c) => c.expires_at,
            Err(_) => None,
        }
    }

    /// Whether the token names a service account and has not expired by
    /// `clock`: [`Credential::current_claims_by`] without copying the claims.
    pub fn check_current(&self, clock: &Clock) -> Result<(), IdentityError> {
        let claims = self.parsed().as_ref().map_err(Clone::clone)?;
        match claims.expires_at {
            Some(exp) if exp <= clock.unix_now() => Err(IdentityError::Expired { exp }),
            _ => Ok(()),
        }
    }

    /// The SPIFFE ID the token's service account has in `trust_domain`,
    /// unless the token names none or has expired by `clock`. Made once per
    /// token and trust domain; its expiry is checked at each call.
    pub fn spiffe_id_by(
        &self,
        trust_domain: &str,
        clock: &Clock,
    ) -> Result<SpiffeId, IdentityError> {
        self.check_current(clock)?;
        if let Some((td, id)) = self.inner.spiffe_id.get() {
            if td == trust_domain {
                return Ok(id.clone());
            }
        }
        let claims = self.parsed().as_ref().map_err(Clone::clone)?;
        let id = claims.service_account.spiffe_id(trust_domain);
        let _ = self
            .inner
            .spiffe_id
            .set((trust_domain.to_string(), id.clone()));
        Ok(id)
    }
}

fn parse_claims(jwt: &str) -> Result<Claims, IdentityError> {
    let mut parts = jwt.split('.');
    let (Some(_header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(IdentityError::NotAJwt);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| IdentityError::BadPayload)?;
    let raw: RawClaims = serde_json::from_slice(&bytes).map_err(|_| IdentityError::BadPayload)?;
    Ok(Claims {
        service_account: raw.service_account()?,
        expires_at: raw.exp,
        issued_at: raw.iat,
    })
}

impl Claims {
    /// The claims, unless the token has expired at `now_unix` (seconds since
    /// the Unix epoch). A token without `exp` never expires.
    pub fn current_at(self, now_unix: i64) -> Result<Self, IdentityError> {
        match self.expires_at {
            Some(exp) if exp <= now_unix => Err(IdentityError::Expired { exp }),
            _ => Ok(self),
        }
    }
}

impl Credential {
    /// The claims of a token that has not expired by `clock`.
    pub fn current_claims_by(&self, clock: &Clock) -> Result<Claims, IdentityError> {
        self.claims()?.current_at(clock.unix_now())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential(sha256:{}…)", self.fingerprint())
    }
}

impl Credential {
    /// Whether `other` is a clone of this credential (not only the same JWT).
    #[cfg(test)]
    pub(crate) fn shares(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl PartialEq for Credential {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.inner, &other.inner) || self.expose() == other.expose()
    }
}
impl Eq for Credential {}

/// What the agent learns from a JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub service_account: ServiceAccount,
    /// `exp`, seconds since the Unix epoch, when the token has one.
    pub expires_at: Option<i64>,
    /// `iat`, seconds since the Unix epoch, when the token has one.
    pub issued_at: Option<i64>,
}

/// A Kubernetes service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> SpiffeId {
        SpiffeId(format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.name
        ))
    }
}

/// A SPIFFE ID, e.g. `spiffe://cluster.local/ns/default/sa/httpbin`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(pub String);

impl SpiffeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain, without the scheme: `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        let rest = self.0.strip_prefix("spiffe://").unwrap_or(&self.0);
        rest.split('/').next().unwrap_or(rest)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    exp: Option<i64>,
    iat: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: Option<String>,
    serviceaccount: Option<NamedRef>,
}

#[derive(Deserialize)]
struct NamedRef {
    name: Option<String>,
}

impl RawClaims {
    fn service_account(&self) -> Result<ServiceAccount, IdentityError> {
        let from_sub = self.sub.as_deref().and_then(|sub| {
            let rest = sub.strip_prefix("system:serviceaccount:")?;
            let (ns, name) = rest.split_once(':')?;
            Some((ns.to_string(), name.to_string()))
        });
        let from_projected = || {
            let k = self.kubernetes.as_ref()?;
            Some((
                k.namespace.clone()?,
                k.serviceaccount.as_ref()?.name.clone()?,
            ))
        };
        let (namespace, name) = from_sub
            .or_else(from_projected)
            .ok_or(IdentityError::NoServiceAccount)?;
        if !is_k8s_label(&namespace) || !is_k8s_name(&name) {
            return Err(IdentityError::BadName(format!("{namespace}/{name}")));
        }
        Ok(ServiceAccount { namespace, name })
    }
}

/// A service account's name, as Kubernetes checks it: a DNS subdomain (RFC
/// 1123), at most 253 characters of labels joined by '.'. So no name is
/// empty, `.` or `..`, or starts or ends with '.' or '-', and none can step
/// out of the `ns/<namespace>/sa/<name>` it is placed in.
fn is_k8s_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_k8s_label)
}

/// A namespace, as Kubernetes checks it: a DNS label (RFC 1123), at most 63
/// lowercase alphanumerics and '-', starting and ending with an alphanumeric.
fn is_k8s_label(s: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter().all(|&c| alnum(c) || c == b'-')
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;

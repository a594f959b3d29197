//! The roots a Vault PKI mount trusts: every unexpired self-signed issuer it
//! lists. `ROOTCA` is built from these, so that every agent of a mesh (each
//! renewing at its own time) serves the same roots, including a new root
//! made by `root/rotate/internal` before any certificate chains to it, and an
//! old one while the mount still lists it.
//!
//! `LIST {mount}/issuers` and `GET {mount}/issuer/{id}/pem` are
//! unauthenticated on Vault and OpenBao (checked on OpenBao 2.7.2): no token
//! is sent and no policy is needed. An issuer's certificate never changes, so
//! each is fetched once and kept while the mount lists it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use super::http::VaultHttp;
use crate::ca::CaError;
use crate::clock::Clock;
use crate::crypto::{cert_not_after, is_issued_by, is_self_signed, split_pem_certs};
use crate::metrics::{self, CaKind};

/// Most issuers read from one mount: a mount lists a handful; thousands
/// would be a mistake or an attack, and each costs a request.
pub const MAX_ISSUERS: usize = 256;
/// Issuer certificates fetched at once.
const FETCH_CONCURRENCY: usize = 8;

/// The issuers of one PKI mount, as last read.
pub(super) struct MountRoots {
    mount: String,
    /// Issuer ID → its certificate.
    issuers: Mutex<HashMap<String, IssuerCert>>,
    /// What an issuer's expiry is compared with.
    clock: Clock,
}

#[derive(Clone)]
struct IssuerCert {
    pem: String,
    self_signed: bool,
    not_after: SystemTime,
}

impl IssuerCert {
    fn is_live_root(&self, now: SystemTime) -> bool {
        self.self_signed && self.not_after > now
    }
}

impl MountRoots {
    pub fn new(mount: String, clock: Clock) -> Self {
        Self {
            mount,
            issuers: Mutex::new(HashMap::new()),
            clock,
        }
    }

    pub fn mount(&self) -> &str {
        &self.mount
    }

    /// Every unexpired self-signed issuer the mount lists now, PEM. One
    /// `roots` CA request in the metrics, whether asked for the trust bundle
    /// or while signing.
    pub async fn trust_roots(&self, http: &VaultHttp) -> Result<Vec<String>, CaError> {
        metrics::ca_request(CaKind::Roots, self.read(http)).await
    }

    async fn read(&self, http: &VaultHttp) -> Result<Vec<String>, CaError> {
        let mount = &self.mount;
        let wrap = |e: CaError| {
            e.map_message(|m| {
                format!(
                    "cannot read the roots of the PKI mount {mount} at Vault {}: {m}",
                    http.addr()
                )
            })
        };
        let ids = match http.get_json(&format!("{mount}/issuers?list=true")).await {
            Ok(v) => issuer_ids(&v).map_err(wrap)?,
            // Vault answers a LIST of nothing with 404 and no errors.
            Err(e) if e.status() == Some(404) && e.vault_errors().is_empty() => Vec::new(),
            Err(e) => return Err(wrap(e)),
        };
        let missing: Vec<String> = {
            let known = self.lock();
            ids.iter()
                .filter(|id| !known.contains_key(*id))
                .cloned()
                .collect()
        };
        let fetched = {
            use futures::StreamExt;
            futures::stream::iter(missing)
                .map(|id| async move {
                    let pem = http.get_text(&format!("{mount}/issuer/{id}/pem")).await;
                    (id, pem)
                })
                .buffer_unordered(FETCH_CONCURRENCY)
                .collect::<Vec<_>>()
                .await
        };
        let mut new = Vec::new();
        for (id, pem) in fetched {
            let pem = pem.map_err(wrap)?;
            let cert = issuer_cert(&pem)
                .map_err(|m| wrap(CaError::bad_answer(format!("issuer {id}: {m}"))))?;
            new.push((id, cert));
        }
        let now = self.clock.now();
        let mut issuers = self.lock();
        issuers.extend(new);
        issuers.retain(|id, _| ids.contains(id));
        Ok(ids
            .iter()
            .filter_map(|id| issuers.get(id))
            .filter(|c| c.is_live_root(now))
            .map(|c| c.pem.clone())
            .collect())
    }

    /// A root of the mount that signed `top` (the last certificate of a
    /// chain Vault gave without its root): from what was read before, else
    /// from a fresh read of the mount.
    pub async fn root_of(&self, http: &VaultHttp, top: &str) -> Result<Option<String>, CaError> {
        let find = |roots: Vec<String>| roots.into_iter().find(|r| is_issued_by(top, r));
        let now = self.clock.now();
        let known: Vec<String> = self
            .lock()
            .values()
            .filter(|c| c.is_live_root(now))
            .map(|c| c.pem.clone())
            .collect();
        if let Some(root) = find(known) {
            return Ok(Some(root));
        }
        Ok(find(self.trust_roots(http).await?))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, IssuerCert>> {
        self.issuers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The issuer IDs of a LIST answer, checked: a bounded number of plain IDs
/// (they become URL path segments).
pub(super) fn issuer_ids(v: &serde_json::Value) -> Result<Vec<String>, CaError> {
    issuer_ids_or(v).map_err(CaError::bad_answer)
}

fn issuer_ids_or(v: &serde_json::Value) -> Result<Vec<String>, String> {
    let keys = v["data"]["keys"]
        .as_array()
        .ok_or("the issuer list has no data.keys")?;
    if keys.len() > MAX_ISSUERS {
        return Err(format!(
            "the mount lists {} issuers, more than the {MAX_ISSUERS} the agent reads",
            keys.len()
        ));
    }
    keys.iter()
        .map(|k| {
            k.as_str()
                .filter(|s| {
                    !s.is_empty()
                        && s.len() <= 128
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                })
                .map(String::from)
                .ok_or_else(|| format!("the issuer list holds an invalid issuer ID {k}"))
        })
        .collect()
}

fn issuer_cert(pem: &str) -> Result<IssuerCert, String> {
    let first = split_pem_certs(pem)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("no certificate")?;
    Ok(IssuerCert {
        self_signed: is_self_signed(&first),
        not_after: cert_not_after(&first).ok_or("the certificate has no readable NotAfter")?,
        pem: first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn issuer_lists_are_checked() {
        let ok = json!({"data": {"keys": ["79d6da38-060f-bbf5-0ce4-b305c7bc6958"]}});
        assert_eq!(issuer_ids(&ok).unwrap().len(), 1);
        assert!(issuer_ids(&json!({"data": {}})).is_err());
        assert!(issuer_ids(&json!({"data": {"keys": ["../../sys/seal"]}})).is_err());
        assert!(issuer_ids(&json!({"data": {"keys": ["a?b"]}})).is_err());
        let many: Vec<String> = (0..=MAX_ISSUERS).map(|i| format!("id{i}")).collect();
        let err = issuer_ids(&json!({"data": {"keys": many}})).unwrap_err();
        assert!(matches!(err, CaError::BadAnswer(_)), "{err:?}");
        assert!(err.message().contains("more than"), "{err:?}");
    }
}

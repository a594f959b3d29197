//! Issuance: a fresh key and CSR, the CA's signature, the checks every
//! answer passes before it is served (a leaf that breaks an X.509-SVID rule
//! Envoy tolerates is served with a warning), and an identity's first fetch.
//!
//! A sign the CA rejects may be a token the CA revoked (Vault rebuilt, the
//! token revoked, the role changed): the token is dropped, the caller logs in
//! once more and the sign is retried once; a second rejection is reported.

use std::sync::Arc;

use super::cache::{Entry, Installed};
use super::{SecretError, SecretManager, WorkloadSecret};
use crate::ca::queue::Priority;
use crate::ca::{Authorization, CaError};
use crate::clock::rfc3339;
use crate::crypto::{verify_issued, CryptoError, IssuedChain, KeyType, LeafInfo, PrivateKey};
use crate::identity::{Credential, SpiffeId};

/// A key made for one certificate, and its CSR.
pub(super) struct NewKey {
    key: PrivateKey,
    csr: String,
}

impl NewKey {
    /// Makes a key on a blocking thread (RSA keys take hundreds of ms).
    pub async fn generate(key_type: KeyType, identity: &SpiffeId) -> Result<Self, SecretError> {
        let id = identity.clone();
        tokio::task::spawn_blocking(move || -> Result<_, CryptoError> {
            let key = PrivateKey::generate(key_type)?;
            let csr = key.csr_pem(&id)?;
            Ok(NewKey { key, csr })
        })
        .await
        .map_err(|e| SecretError::Internal(format!("key generation task failed: {e}")))?
        .map_err(|e| SecretError::Internal(e.to_string()))
    }
}

/// Why a first fetch did not install a certificate.
pub(super) enum FetchError {
    /// The entry was forgotten meanwhile: start over with a fresh one.
    Forgotten,
    Failed(SecretError),
}

impl SecretManager {
    /// Has the CA sign `key`'s CSR with `auth`, and checks the answer. The
    /// caller holds a CA queue permit.
    pub(super) async fn sign_checked(
        &self,
        identity: &SpiffeId,
        auth: &Authorization,
        key: &NewKey,
    ) -> Result<(IssuedChain, LeafInfo), SecretError> {
        let sign_err = |error| SecretError::Sign {
            identity: identity.to_string(),
            error,
        };
        let chain = self
            .ca
            .sign(auth, &key.csr, self.opts.ttl)
            .await
            .map_err(sign_err)?;
        let leaf = verify_issued(
            &chain,
            &key.key.public_key_der(),
            identity,
            self.opts.clock.now(),
        )
        .map_err(|e| {
            sign_err(CaError::bad_answer(format!(
                "{} returned {e}; not served",
                self.ca.describe()
            )))
        })?;
        self.svid_warnings.warn(
            identity,
            &leaf.serial_hex,
            &self.ca.describe(),
            &leaf.svid_breaches,
        );
        Ok((chain, leaf))
    }

    /// The secret served from a checked chain; its roots join the trust
    /// bundle for as long as it is in use.
    pub(super) fn secret(
        &self,
        identity: &SpiffeId,
        key: NewKey,
        chain: IssuedChain,
        leaf: LeafInfo,
    ) -> Arc<WorkloadSecret> {
        let received = self.opts.clock.now();
        let start = leaf.not_before.max(received);
        let lifetime = leaf.not_after.duration_since(start).unwrap_or_default();
        let roots = self.trust.hold(&chain.roots_pem, lifetime);
        Arc::new(WorkloadSecret {
            identity: identity.clone(),
            key: key.key,
            chain_pem: chain.chain_pem.concat(),
            leaf,
            received,
            roots,
            memo: Default::default(),
        })
    }

    /// Makes sure `entry` serves a usable certificate: waits for a fetch in
    /// flight, else fetches the first one (or a new one, when the cached one
    /// has expired) with the caller's proven credential.
    pub(super) async fn first_fetch(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        credential: &Credential,
        auth: Authorization,
    ) -> Result<(), FetchError> {
        if self.usable(entry) {
            return Ok(());
        }
        let _fetching = entry.fetch.lock().await;
        if entry.is_forgotten() {
            return Err(FetchError::Forgotten);
        }
        // Another caller may have fetched while this one waited.
        if self.usable(entry) {
            return Ok(());
        }
        let identity = &entry.key.identity;
        let key = NewKey::generate(self.opts.key_type, identity)
            .await
            .map_err(FetchError::Failed)?;
        let (chain, leaf) = {
            let _permit = self.queue.acquire(Priority::FirstFetch).await;
            match self.sign_checked(identity, &auth, &key).await {
                Err(e) if e.is_token_refused() => {
                    tracing::warn!(identity = %identity, "the CA refused to sign with a cached authorization: {e}; logging in again and retrying once");
                    self.ca.invalidate(&auth);
                    crate::metrics::retry(crate::metrics::Retry::CaRequest);
                    let auth = self
                        .ca
                        .login(credential)
                        .await
                        .map_err(|e| FetchError::Failed(SecretError::Login(e)))?;
                    self.sign_checked(identity, &auth, &key).await.inspect_err(|e| {
                        if e.is_token_refused() {
                            self.ca.invalidate(&auth);
                        }
                    })
                }
                other => other,
            }
            .map_err(FetchError::Failed)?
        };
        let secret = self.secret(identity, key, chain, leaf);
        tracing::info!(
            identity = %identity,
            serial = %secret.leaf.serial_hex,
            expires = %rfc3339(secret.leaf.not_after),
            "issued workload certificate"
        );
        match self.cache.install(entry, secret, self.trust.current()) {
            Ok(Installed::First) => {
                tokio::spawn(self.clone().rotate(entry.clone()));
                Ok(())
            }
            Ok(Installed::Replaced) => Ok(()),
            Err(_) => Err(FetchError::Forgotten),
        }
    }

    /// A cached certificate may be handed out while it is valid for at least
    /// another second.
    fn usable(&self, entry: &Entry) -> bool {
        entry.current().is_some_and(|s| {
            s.leaf.not_after > self.opts.clock.now() + std::time::Duration::from_secs(1)
        })
    }
}

//! `CA_PROVIDER=VaultCA`: HashiCorp Vault / OpenBao PKI.
//!
//! Each workload logs in with its own JWT (`POST /v1/{VAULT_AUTH_PATH}`), and
//! its CSR is signed with the token Vault gave it (`POST /v1/{VAULT_SIGN_CSR_PATH}`),
//! so Vault's auth role and PKI role decide who gets which identity.
//!
//! - [`http_client`]: the one builder of HTTP clients for Vault (time-outs,
//!   TLS roots, redirects), shared with `vault-setup`.
//! - [`http`]: requests through it, and Vault's errors.
//! - [`login`]: tokens cached per JWT, rejections held down, revocation.
//! - [`chain`]: the chain and root served, from a sign answer.
//! - [`roots`]: the roots the PKI mount lists (`ROOTCA` of every agent).
//!
//! Unlike Istio 1.1, the token is cached per distinct JWT (one login per JWT,
//! not per CSR), never past the JWT's `exp`; concurrent logins with one JWT
//! are coalesced; every call has time-outs; a rejection (of a JWT at login,
//! of a token at sign) is answered from memory for a short hold-down so that
//! Envoy's reconnects do not hammer Vault; and tokens no longer needed are
//! revoked.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use super::{Authorization, CaClient, CaError, CaFailure};
use crate::clock::Clock;
use crate::config::VaultConfig;
use crate::crypto::IssuedChain;
use crate::identity::Credential;
use crate::metrics::{self, CaKind};

#[cfg(test)]
mod answer_props;
mod chain;
mod http;
pub mod http_client;
mod login;
mod revoke;
mod roots;

pub use chain::chain_from_sign_answer;
pub use http::VaultSetupError;
pub use http_client::MAX_REDIRECTS;
pub use login::REJECTION_HOLD_DOWN;
pub use revoke::SHUTDOWN_REVOKE_BUDGET;
pub use roots::MAX_ISSUERS;

use http::VaultHttp;
use login::Logins;
use roots::MountRoots;

/// The Vault client.
pub struct VaultCa {
    cfg: VaultConfig,
    http: VaultHttp,
    logins: Logins,
    roots: MountRoots,
}

#[derive(Deserialize)]
struct SignAnswer {
    data: Option<SignData>,
}

#[derive(Deserialize)]
struct SignData {
    certificate: Option<String>,
    issuing_ca: Option<String>,
    #[serde(default)]
    ca_chain: Option<Vec<String>>,
}

/// The certificate and the rest of a sign answer (`data.certificate`,
/// `data.issuing_ca`, `data.ca_chain`), or what is missing, as Vault at
/// `addr` answered.
fn sign_answer(v: serde_json::Value, addr: &str) -> Result<(String, SignData), CaError> {
    let bad = |m: String| {
        CaError::BadAnswer(CaFailure::new(format!(
            "Vault at {addr} answered the sign request with {m}"
        )))
    };
    let answer: SignAnswer =
        serde_json::from_value(v).map_err(|e| bad(format!("an unexpected shape: {e}")))?;
    let data = answer.data.ok_or_else(|| bad("no data".into()))?;
    let certificate = data
        .certificate
        .clone()
        .ok_or_else(|| bad("no data.certificate".into()))?;
    Ok((certificate, data))
}

impl VaultCa {
    pub fn new(cfg: VaultConfig) -> Result<Self, VaultSetupError> {
        let http = VaultHttp::new(&cfg)?;
        if cfg.addr.starts_with("http://") {
            tracing::warn!(
                vault = %cfg.addr,
                "VAULT_ADDR is http://: every workload's JWT, the Vault tokens and the certificates \
                 travel in clear text; use https:// outside a test bed"
            );
        }
        Ok(Self {
            roots: MountRoots::new(cfg.pki_mount.clone(), Clock::system()),
            logins: Logins::new(Clock::system()),
            http,
            cfg,
        })
    }

    /// The same client, reading time from `clock` instead of the system
    /// clock: whether a JWT has expired, how long its token is used, which
    /// of the mount's roots are still valid.
    pub fn with_clock(self, clock: Clock) -> Self {
        Self {
            roots: MountRoots::new(self.cfg.pki_mount.clone(), clock),
            logins: Logins::new(clock),
            ..self
        }
    }

    /// The chain of a sign answer, with its root: the self-signed end of the
    /// chain Vault gave, else the mount's root that issued its last
    /// certificate, else a refusal saying how to fix the mount.
    async fn chain_with_root(
        &self,
        certificate: &str,
        data: &SignData,
    ) -> Result<IssuedChain, String> {
        let mut chain = chain_from_sign_answer(
            certificate,
            data.issuing_ca.as_deref(),
            data.ca_chain.as_deref(),
        )?;
        if !chain.roots_pem.is_empty() {
            return Ok(chain);
        }
        let top = chain.chain_pem.last().expect("a chain has a leaf").clone();
        let mount = self.roots.mount();
        match self.roots.root_of(&self.http, &top).await {
            Ok(Some(root)) => {
                tracing::debug!(mount, "the sign answer had no root; using the mount's root that issued its chain");
                chain.roots_pem = vec![root];
                Ok(chain)
            }
            Ok(None) => Err(format!(
                "a chain without its root (it ends in {:?}, which is not self-signed), and the PKI \
                 mount {mount} lists no root that issued it: import the root certificate into the \
                 mount (`bao write {mount}/issuers/import/cert pem_bundle=@root.pem`), or set the \
                 intermediate with its full chain; not served, as Envoy needs the root to trust peers",
                crate::crypto::cert_summary(&top)
                    .map(|s| s.0)
                    .unwrap_or_default()
            )),
            Err(e) => Err(format!(
                "a chain without its root, and reading the mount's roots failed: {}",
                e.message()
            )),
        }
    }
}

#[async_trait]
impl CaClient for VaultCa {
    fn describe(&self) -> String {
        format!("Vault at {}", self.cfg.addr)
    }

    async fn login(&self, credential: &Credential) -> Result<Authorization, CaError> {
        self.logins
            .login(
                &self.http,
                &self.cfg.auth_path,
                &self.cfg.role,
                credential,
                false,
            )
            .await
    }

    async fn login_anew(&self, credential: &Credential) -> Result<Authorization, CaError> {
        self.logins
            .login(
                &self.http,
                &self.cfg.auth_path,
                &self.cfg.role,
                credential,
                true,
            )
            .await
    }

    async fn cached_login(&self, credential: &Credential) -> Option<Authorization> {
        self.logins.cached(credential).await
    }

    async fn sign(
        &self,
        auth: &Authorization,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        let addr = &self.cfg.addr;
        let token = auth
            .token
            .as_ref()
            .ok_or_else(|| CaError::rejected("no Vault token: the workload has not logged in"))?;
        if let Some(failure) = self.logins.sign_held_down(auth) {
            return Err(CaError::RecentlyRejected(failure));
        }
        // What reaches Vault, counted by its outcome (a chain Vault gave
        // without its root, then unusable, is a bad answer).
        metrics::ca_request(CaKind::Sign, async {
            let body = json!({
                "csr": csr_pem,
                "format": "pem",
                "ttl": format!("{}s", ttl.as_secs().max(1)),
                "exclude_cn_from_sans": true,
            });
            let v = match self
                .http
                .post_json(&self.cfg.sign_csr_path, Some(token), &body)
                .await
            {
                Ok(v) => v,
                Err(CaError::Rejected(f) | CaError::RecentlyRejected(f)) => {
                    let token_refused = f.status() == Some(403);
                    let mut f = f.map_message(|m| format!("Vault at {addr} refused to sign: {m}"));
                    if token_refused {
                        f = f.token_refused();
                    }
                    self.logins.note_sign_rejection(auth, &f);
                    return Err(CaError::Rejected(f));
                }
                Err(CaError::Unavailable(f)) => {
                    return Err(CaError::Unavailable(
                        f.map_message(|m| format!("Vault at {addr} could not sign: {m}")),
                    ))
                }
                Err(CaError::BadAnswer(f)) => {
                    return Err(CaError::BadAnswer(f.map_message(|m| {
                        format!("Vault at {addr} gave an unusable sign answer: {m}")
                    })))
                }
            };
            let bad = |m: String| {
                CaError::BadAnswer(CaFailure::new(format!(
                    "Vault at {addr} answered the sign request with {m}"
                )))
            };
            let (certificate, data) = sign_answer(v, addr)?;
            self.chain_with_root(&certificate, &data).await.map_err(bad)
        })
        .await
    }

    async fn trust_roots(&self) -> Result<Vec<String>, CaError> {
        self.roots.trust_roots(&self.http).await
    }

    fn invalidate(&self, auth: &Authorization) {
        self.logins.invalidate(auth);
    }

    async fn release(&self, credential: &Credential) {
        if let Some(token) = self.logins.release(credential) {
            match revoke::revoke(&self.http, token).await {
                Ok(()) => tracing::debug!(credential = ?credential, "revoked the Vault token of a credential no longer used"),
                Err(e) => tracing::debug!(
                    "revoking the Vault token of a credential no longer used failed (it ends with its lease): {}",
                    e.message()
                ),
            }
        }
    }

    async fn shutdown(&self) {
        let tokens = self.logins.take_all();
        if tokens.is_empty() {
            return;
        }
        let n = tokens.len();
        match tokio::time::timeout(
            SHUTDOWN_REVOKE_BUDGET,
            revoke::revoke_all(&self.http, tokens),
        )
        .await
        {
            Ok(0) => {
                tracing::info!(vault = %self.cfg.addr, tokens = n, "revoked the agent's Vault tokens")
            }
            Ok(failed) => tracing::warn!(
                vault = %self.cfg.addr,
                tokens = n,
                failed,
                "could not revoke every Vault token of the agent; the rest end with their lease"
            ),
            Err(_) => tracing::warn!(
                vault = %self.cfg.addr,
                tokens = n,
                "revoking the agent's Vault tokens took longer than {}s; stopping anyway (the rest end with their lease)",
                SHUTDOWN_REVOKE_BUDGET.as_secs()
            ),
        }
    }
}

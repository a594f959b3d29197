//! `CA_PROVIDER=VaultCA`: HashiCorp Vault / OpenBao PKI.
//!
//! Each workload logs in with its own JWT (`POST /v1/{VAULT_AUTH_PATH}`), and
//! its CSR is signed with the token Vault gave it (`POST /v1/{VAULT_SIGN_CSR_PATH}`),
//! so Vault's auth role and PKI role decide who gets which identity.
//!
//! Unlike Istio 1.1, the token is cached per distinct JWT for its lease (one
//! login per JWT, not per CSR), concurrent logins with one JWT are coalesced,
//! and every call has time-outs. A rejected JWT is remembered for a short
//! hold-down so that Envoy's reconnects do not hammer Vault with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{Authorization, CaClient, CaError};
use crate::config::VaultConfig;
use crate::crypto::{split_pem_certs, IssuedChain};
use crate::identity::Credential;

/// How long a rejected JWT is answered from memory before Vault is asked again.
pub const REJECTION_HOLD_DOWN: Duration = Duration::from_secs(5);
/// A token is re-used until this fraction of its lease is left.
const TOKEN_REFRESH_FRACTION: f64 = 0.1;

/// The Vault client.
pub struct VaultCa {
    cfg: VaultConfig,
    http: reqwest::Client,
    /// One slot per distinct JWT (by SHA-256); its async lock coalesces logins.
    slots: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<LoginSlot>>>>,
}

#[derive(Default)]
struct LoginSlot {
    token: Option<(Arc<Zeroizing<String>>, Instant)>,
    rejected: Option<(CaError, Instant)>,
}

impl LoginSlot {
    /// True while the slot holds something worth keeping.
    fn live(&self, now: Instant) -> bool {
        self.token.as_ref().is_some_and(|(_, until)| *until > now)
            || self
                .rejected
                .as_ref()
                .is_some_and(|(_, until)| *until > now)
    }
}

/// Errors building the client.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the Vault client: {0}")]
pub struct VaultSetupError(String);

impl VaultCa {
    pub fn new(cfg: VaultConfig) -> Result<Self, VaultSetupError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .user_agent(concat!("node-agent/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(pem) = &cfg.tls_root_pem {
            for cert in split_pem_certs(pem)
                .map_err(|e| VaultSetupError(format!("VAULT_TLS_ROOT_CERT: {e}")))?
            {
                let c = reqwest::Certificate::from_pem(cert.as_bytes())
                    .map_err(|e| VaultSetupError(format!("VAULT_TLS_ROOT_CERT: {e}")))?;
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| VaultSetupError(e.to_string()))?;
        Ok(Self {
            cfg,
            http,
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.cfg.addr, path)
    }

    fn slot(&self, credential: &Credential) -> Arc<tokio::sync::Mutex<LoginSlot>> {
        let key: [u8; 32] = Sha256::digest(credential.expose().as_bytes()).into();
        let mut slots = self.slots.lock().expect("vault slots lock poisoned");
        // Forget JWTs whose token and rejection have both lapsed: memory stays
        // bounded by the JWTs in use.
        let now = Instant::now();
        slots.retain(|k, s| *k == key || s.try_lock().map(|s| s.live(now)).unwrap_or(true));
        slots.entry(key).or_default().clone()
    }

    /// POSTs `body` to `path`, returning the JSON answer or a classified error
    /// whose text says what failed, where, with Vault's own errors verbatim.
    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, CaError> {
        let url = self.url(path);
        let mut req = self
            .http
            .post(&url)
            .header("X-Vault-Request", "true")
            .json(&body);
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.cfg.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                return Err(CaError::Unavailable(format!(
                    "Error making API request. URL: POST {url} {what}: {}",
                    error_chain(&e)
                )));
            }
        };
        let status = resp.status();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => {
                return Err(CaError::Unavailable(format!(
                "Error making API request. URL: POST {url} Code: {}. reading the answer failed: {}",
                status.as_u16(),
                error_chain(&e)
            )))
            }
        };
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|e| {
                CaError::BadAnswer(format!(
                    "Error making API request. URL: POST {url} Code: {}. The answer is not JSON: {e}",
                    status.as_u16()
                ))
            });
        }
        let errors = vault_errors(&text);
        let msg = format!(
            "Error making API request. URL: POST {url} Code: {}. Errors: {errors}",
            status.as_u16()
        );
        // 429, 5xx (sealed 503, standby 472/473...) are worth retrying soon; other 4xx are rejections.
        if status.as_u16() == 429
            || status.as_u16() >= 500
            || status.as_u16() == 412
            || status.as_u16() == 408
        {
            Err(CaError::Unavailable(msg))
        } else {
            Err(CaError::Rejected(msg))
        }
    }
}

/// Vault's `{"errors": [...]}` as `* a * b`, or the body's start when it has no such list.
fn vault_errors(body: &str) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<String>,
    }
    match serde_json::from_str::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|m| format!("* {m}"))
            .collect::<Vec<_>>()
            .join(" "),
        Ok(_) => "(none given)".into(),
        Err(_) => {
            let start: String = body.chars().take(200).collect();
            format!("(not a Vault answer) {start:?}")
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

#[derive(Deserialize)]
struct LoginAnswer {
    auth: Option<LoginAuth>,
}

#[derive(Deserialize)]
struct LoginAuth {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
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

/// Builds the chain Envoy is served from a sign answer: the certificate then
/// `ca_chain` (or `issuing_ca`), without duplicates; the roots are the
/// self-signed certificates at its end, or `issuing_ca` when the mount leaves
/// roots out of chains.
pub fn chain_from_sign_answer(
    certificate: &str,
    issuing_ca: Option<&str>,
    ca_chain: Option<&[String]>,
) -> Result<IssuedChain, String> {
    let mut all = split_pem_certs(certificate).map_err(|e| format!("data.certificate: {e}"))?;
    all.truncate(1);
    let rest: Vec<String> = match (ca_chain, issuing_ca) {
        (Some(chain), _) if !chain.is_empty() => chain.to_vec(),
        (_, Some(ica)) => vec![ica.to_string()],
        _ => return Err("the answer has neither data.ca_chain nor data.issuing_ca".into()),
    };
    for pem in rest {
        for c in split_pem_certs(&pem).map_err(|e| format!("data.ca_chain: {e}"))? {
            if !all.contains(&c) {
                all.push(c);
            }
        }
    }
    let roots: Vec<String> = all
        .iter()
        .skip(1)
        .filter(|c| is_self_signed(c))
        .cloned()
        .collect();
    let roots = if roots.is_empty() {
        let ica =
            issuing_ca.ok_or("the chain has no root and the answer has no data.issuing_ca")?;
        split_pem_certs(ica).map_err(|e| format!("data.issuing_ca: {e}"))?
    } else {
        roots
    };
    Ok(IssuedChain {
        chain_pem: all,
        roots_pem: roots,
    })
}

fn is_self_signed(pem: &str) -> bool {
    let Some(Ok(block)) = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).next() else {
        return false;
    };
    let Ok(cert) = block.parse_x509() else {
        return false;
    };
    cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok()
}

#[async_trait]
impl CaClient for VaultCa {
    fn describe(&self) -> String {
        format!("Vault at {}", self.cfg.addr)
    }

    async fn login(&self, credential: &Credential) -> Result<Authorization, CaError> {
        let slot = self.slot(credential);
        let mut slot = slot.lock().await;
        let now = Instant::now();
        if let Some((token, until)) = &slot.token {
            if *until > now {
                return Ok(Authorization {
                    token: Some(token.clone()),
                });
            }
        }
        if let Some((err, until)) = &slot.rejected {
            if *until > now {
                return Err(CaError::RecentlyRejected(err.message().to_string()));
            }
        }
        let body = json!({ "role": self.cfg.role, "jwt": credential.expose() });
        let result = self
            .post(&self.cfg.auth_path, None, body)
            .await
            .and_then(|v| {
                let answer: LoginAnswer = serde_json::from_value(v).map_err(|e| {
                    CaError::BadAnswer(format!(
                        "the login answer is not a Vault auth response: {e}"
                    ))
                })?;
                answer
                    .auth
                    .filter(|a| !a.client_token.is_empty())
                    .ok_or_else(|| {
                        CaError::BadAnswer("the login answer has no auth.client_token".into())
                    })
            });
        match result {
            Ok(auth) => {
                // Re-login before the lease runs out; a lease of 0 means no expiry.
                let lease = if auth.lease_duration == 0 {
                    Duration::from_secs(24 * 3600)
                } else {
                    Duration::from_secs(auth.lease_duration)
                };
                let until = now + lease.mul_f64(1.0 - TOKEN_REFRESH_FRACTION);
                let token = Arc::new(Zeroizing::new(auth.client_token));
                slot.token = Some((token.clone(), until));
                slot.rejected = None;
                tracing::info!(vault = %self.cfg.addr, lease_seconds = lease.as_secs(), "logged in to Vault");
                Ok(Authorization { token: Some(token) })
            }
            Err(e) => {
                tracing::error!("failed to login Vault: {}", e.message());
                let wrap = |m: &str| format!("failed to login Vault at {}: {m}", self.cfg.addr);
                let e = match e {
                    CaError::Rejected(m) => CaError::Rejected(wrap(&m)),
                    CaError::RecentlyRejected(m) => CaError::RecentlyRejected(wrap(&m)),
                    CaError::Unavailable(m) => CaError::Unavailable(wrap(&m)),
                    CaError::BadAnswer(m) => CaError::BadAnswer(wrap(&m)),
                };
                if matches!(e, CaError::Rejected(_)) {
                    slot.rejected = Some((e.clone(), now + REJECTION_HOLD_DOWN));
                }
                Err(e)
            }
        }
    }

    async fn cached_login(&self, credential: &Credential) -> Option<Authorization> {
        let slot = self.slot(credential);
        let slot = slot.lock().await;
        match &slot.token {
            Some((token, until)) if *until > Instant::now() => Some(Authorization {
                token: Some(token.clone()),
            }),
            _ => None,
        }
    }

    async fn sign(
        &self,
        auth: &Authorization,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        let token = auth.token.as_ref().ok_or_else(|| {
            CaError::Rejected("no Vault token: the workload has not logged in".into())
        })?;
        let body = json!({
            "csr": csr_pem,
            "format": "pem",
            "ttl": format!("{}s", ttl.as_secs().max(1)),
            "exclude_cn_from_sans": true,
        });
        let at = |m: String| format!("Vault at {} refused to sign: {m}", self.cfg.addr);
        let v = self
            .post(&self.cfg.sign_csr_path, Some(token), body)
            .await
            .map_err(|e| match e {
                CaError::Rejected(m) | CaError::RecentlyRejected(m) => CaError::Rejected(at(m)),
                CaError::Unavailable(m) => {
                    CaError::Unavailable(format!("Vault at {} could not sign: {m}", self.cfg.addr))
                }
                CaError::BadAnswer(m) => CaError::BadAnswer(format!(
                    "Vault at {} gave an unusable sign answer: {m}",
                    self.cfg.addr
                )),
            })?;
        let bad = |m: String| {
            CaError::BadAnswer(format!(
                "Vault at {} answered the sign request with {m}",
                self.cfg.addr
            ))
        };
        let answer: SignAnswer =
            serde_json::from_value(v).map_err(|e| bad(format!("an unexpected shape: {e}")))?;
        let data = answer.data.ok_or_else(|| bad("no data".into()))?;
        let certificate = data
            .certificate
            .ok_or_else(|| bad("no data.certificate".into()))?;
        chain_from_sign_answer(
            &certificate,
            data.issuing_ca.as_deref(),
            data.ca_chain.as_deref(),
        )
        .map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_errors_are_quoted_verbatim() {
        assert_eq!(
            vault_errors(r#"{"errors":["service account name not authorized"]}"#),
            "* service account name not authorized"
        );
        assert_eq!(vault_errors(r#"{"errors":["a","b"]}"#), "* a * b");
        assert!(vault_errors("<html>bad gateway</html>").contains("not a Vault answer"));
    }

    #[test]
    fn chain_dedupes_and_finds_the_root() {
        let root = crate::ca::local::LocalCa::new(None, "cluster.local").unwrap();
        let root_pem = root.root_pem().to_string();
        let key = crate::crypto::PrivateKey::generate(crate::crypto::KeyType::EcP256).unwrap();
        let id = crate::identity::SpiffeId("spiffe://cluster.local/ns/a/sa/b".into());
        let leaf = root
            .sign_csr(&key.csr_pem(&id).unwrap(), Duration::from_secs(60))
            .unwrap();

        // ca_chain holding the root (and the issuing_ca repeating it).
        let c = chain_from_sign_answer(
            &leaf,
            Some(&root_pem),
            Some(std::slice::from_ref(&root_pem)),
        )
        .unwrap();
        assert_eq!(c.chain_pem.len(), 2);
        assert_eq!(c.roots_pem, split_pem_certs(&root_pem).unwrap());
        // No ca_chain: issuing_ca is used.
        let c = chain_from_sign_answer(&leaf, Some(&root_pem), None).unwrap();
        assert_eq!(c.chain_pem.len(), 2);
        // Garbage is refused.
        assert!(chain_from_sign_answer("nope", Some(&root_pem), None).is_err());
        assert!(chain_from_sign_answer(&leaf, None, None).is_err());
    }
}

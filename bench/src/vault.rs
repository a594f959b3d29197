//! The Vault side: a real OpenBao set up like the Istio tutorial (PKI mount
//! `istio_ca`, role `istio-pki-role` made `no_store`, kubernetes auth role
//! `istio-cert` for any service account in namespace `bench`), the TokenReview
//! stand-in on its own runtime thread, and the JWTs of the benchmark's
//! workloads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use reqwest::Method;
use serde_json::json;

use crate::support::bao::{self, Bao, TutorialOptions};
use crate::support::k8s::TestIssuer;

pub const NAMESPACE: &str = "bench";
pub const TRUST_DOMAIN: &str = "cluster.local";
pub const AUTH_PATH: &str = "auth/kubernetes/login";
pub const SIGN_PATH: &str = "istio_ca/sign/istio-pki-role";
/// Where `bao agent` has Vault issue its key and certificate: a PKI role like
/// the tutorial's but with the agent's key type, as `issue` needs one.
pub const PEER_ISSUE_PATH: &str = "istio_ca/issue/bao-agent";
/// The kubernetes auth role `bao agent` logs in with (may issue, not sign).
pub const PEER_ROLE: &str = "bao-agent";

pub struct VaultBench {
    pub bao: Bao,
    pub issuer: TestIssuer,
    /// Keeps the TokenReview stand-in's runtime alive.
    _review: std::thread::JoinHandle<()>,
}

impl VaultBench {
    pub async fn start(work: &Path) -> anyhow::Result<Self> {
        let issuer = TestIssuer::load_or_generate(&work.join("issuer-key.pem"))?;
        // The TokenReview stand-in gets its own runtime and thread, so the
        // load generator's tasks never delay Vault's calls to it.
        let pem = issuer.public_key_pem();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let review = std::thread::Builder::new()
            .name("token-review".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    match crate::support::k8s::start_token_review(&pem, 0).await {
                        Ok(h) => {
                            let _ = tx.send(Ok(h.url()));
                            std::future::pending::<()>().await;
                            drop(h);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })?;
        let review_url = rx.await.map_err(|_| anyhow!("TokenReview thread died"))??;
        let bao = Bao::start_tls().await.context("start OpenBao")?;
        let mut opts = TutorialOptions::new(&review_url, TRUST_DOMAIN);
        opts.sa_names = vec!["*".into()];
        opts.sa_namespaces = vec![NAMESPACE.into()];
        opts.cert_ttl = "1h".into();
        opts.token_ttl = "1h".into();
        bao::setup_tutorial_with(&bao, &issuer, &opts).await?;
        let v = Self {
            bao,
            issuer,
            _review: review,
        };
        v.make_no_store().await?;
        v.add_peer_role().await?;
        Ok(v)
    }

    /// Vault does not store what the PKI role issues (the setting for a
    /// mesh CA: certificates are short-lived and many), and leaves carry the
    /// key usage `vault-setup` sets (an EC leaf with Vault's default
    /// keyEncipherment is served with a warning, and the harness allows no
    /// warning).
    async fn make_no_store(&self) -> anyhow::Result<()> {
        let path = "istio_ca/roles/istio-pki-role";
        let mut role = self.bao.root(Method::GET, path, None).await?["data"].take();
        role["no_store"] = json!(true);
        role["key_usage"] = json!(["DigitalSignature"]);
        self.bao.root(Method::POST, path, Some(role)).await?;
        let back = self.bao.root(Method::GET, path, None).await?;
        anyhow::ensure!(
            back["data"]["no_store"] == json!(true),
            "no_store did not stick"
        );
        Ok(())
    }

    /// `bao agent`'s templates cannot build a CSR, so it has Vault `issue`
    /// (Vault makes the key): a PKI role like the tutorial's with node-agent's
    /// default key type, and an auth role whose policy allows only that.
    async fn add_peer_role(&self) -> anyhow::Result<()> {
        let mut role = self
            .bao
            .root(Method::GET, "istio_ca/roles/istio-pki-role", None)
            .await?["data"]
            .take();
        role["key_type"] = json!("ec");
        role["key_bits"] = json!(256);
        self.bao
            .root(Method::POST, "istio_ca/roles/bao-agent", Some(role))
            .await?;
        self.bao
            .root(
                Method::POST,
                "sys/policies/acl/bench-bao-agent",
                Some(json!({
                    "policy": format!("path \"{PEER_ISSUE_PATH}\" {{\n  capabilities = [\"create\", \"update\"]\n}}\n")
                })),
            )
            .await?;
        self.bao
            .root(
                Method::POST,
                &format!("auth/kubernetes/role/{PEER_ROLE}"),
                Some(json!({
                    "bound_service_account_names": ["*"],
                    "bound_service_account_namespaces": [NAMESPACE],
                    "token_policies": ["bench-bao-agent"],
                    "token_ttl": "1h",
                })),
            )
            .await?;
        Ok(())
    }

    pub fn addr(&self) -> String {
        self.bao.addr()
    }

    pub fn ca_pem_path(&self) -> PathBuf {
        self.bao.ca_pem_path()
    }

    pub fn audit_log(&self) -> PathBuf {
        self.bao.audit_log_path()
    }

    /// The agent's settings, as the tutorial gives them (each call names a
    /// fresh status port).
    pub fn agent_env(&self) -> Vec<(String, String)> {
        [
            ("CA_PROVIDER", "VaultCA".to_string()),
            ("CA_ADDR", self.addr()),
            ("VAULT_ADDR", self.addr()),
            ("VAULT_AUTH_PATH", AUTH_PATH.into()),
            ("VAULT_ROLE", "istio-cert".into()),
            ("VAULT_SIGN_CSR_PATH", SIGN_PATH.into()),
            (
                "VAULT_TLS_ROOT_CERT",
                self.ca_pem_path().display().to_string(),
            ),
            ("TRUST_DOMAIN", TRUST_DOMAIN.into()),
            ("SECRET_TTL", "1h".into()),
            // The status server stays on, as users run it, on a port of its
            // own (the default 15020 may be another agent's on this machine).
            (
                "STATUS_ADDR",
                format!("127.0.0.1:{}", crate::support::ports::free_port()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Projected service-account tokens for `names` (namespace `bench`), made
    /// on every core: RS256 signing is the slow part of a benchmark's setup.
    pub fn mint(&self, names: &[String]) -> Vec<String> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = names.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let parts: Vec<_> = names
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|n| self.issuer.mint(NAMESPACE, n, Duration::from_secs(3600)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|p| p.join().expect("mint thread"))
                .collect()
        })
    }
}

/// The SPIFFE ID of service account `name` in the benchmark's namespace.
pub fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{name}")
}

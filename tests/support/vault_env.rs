//! The tutorial's Vault environment for tests: a real OpenBao (TLS), its PKI
//! mount `istio_ca` with role `istio-pki-role`, the `kubernetes` auth method
//! with role `istio-cert` backed by a TokenReview server that really verifies
//! service-account JWTs, and the `jwt` auth method with the same key.

use std::path::PathBuf;
use std::time::Duration;

use super::bao::{
    setup_tutorial_with, Bao, ProxyMode, ToggleProxy, TutorialOptions, TutorialSetup,
};
use super::k8s::{start_token_review, TestIssuer, TokenReviewHandle};

pub const TRUST_DOMAIN: &str = "cluster.local";

pub struct VaultEnv {
    pub bao: Bao,
    pub issuer: TestIssuer,
    pub review: TokenReviewHandle,
    pub setup: TutorialSetup,
    /// Optional outage switch in front of Vault (see [`VaultEnv::with_proxy`]).
    pub proxy: Option<ToggleProxy>,
    /// The Vault namespace everything was set up in, if any.
    pub namespace: Option<String>,
}

/// The test issuer's key is costly to make: one per test run, cached.
pub fn issuer() -> TestIssuer {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("issuer-key.pem");
    TestIssuer::load_or_generate(&path).expect("test JWT issuer key")
}

impl VaultEnv {
    pub async fn start() -> VaultEnv {
        Self::start_opts(|_| {}).await
    }

    /// Starts with tutorial options adjusted by `f`.
    pub async fn start_opts(f: impl FnOnce(&mut TutorialOptions)) -> VaultEnv {
        let issuer = issuer();
        let review = start_token_review(&issuer.public_key_pem(), 0)
            .await
            .expect("token review server");
        let bao = Bao::start_tls().await.expect("start OpenBao");
        let mut opts = TutorialOptions::new(&review.url(), TRUST_DOMAIN);
        f(&mut opts);
        let setup = setup_tutorial_with(&bao, &issuer, &opts)
            .await
            .expect("tutorial setup");
        VaultEnv {
            namespace: opts.namespace.clone(),
            bao,
            issuer,
            review,
            setup,
            proxy: None,
        }
    }

    /// Puts an outage switch between the agent and Vault, in `mode`.
    pub async fn with_proxy(mut self, mode: ProxyMode) -> VaultEnv {
        self.proxy = Some(
            ToggleProxy::start(self.bao.socket_addr(), mode)
                .await
                .expect("proxy"),
        );
        self
    }

    /// The address the agent should use: through the proxy when there is one.
    pub fn agent_addr(&self) -> String {
        match &self.proxy {
            Some(p) => p.https_url(),
            None => self.bao.addr(),
        }
    }

    /// The tutorial's settings for the agent, with the dev CA given as a file path.
    pub fn agent_env(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("CA_PROVIDER", "VaultCA".into()),
            ("CA_ADDR", self.agent_addr()),
            ("VAULT_ADDR", self.agent_addr()),
            ("VAULT_AUTH_PATH", "auth/kubernetes/login".into()),
            ("VAULT_ROLE", "istio-cert".into()),
            ("VAULT_SIGN_CSR_PATH", "istio_ca/sign/istio-pki-role".into()),
            (
                "VAULT_TLS_ROOT_CERT",
                self.bao.ca_pem_path().display().to_string(),
            ),
            ("SECRET_TTL", "1h".into()),
        ];
        if let Some(ns) = &self.namespace {
            vars.push(("VAULT_NAMESPACE", ns.clone()));
        }
        vars
    }

    /// [`VaultEnv::agent_env`] with some settings replaced or added.
    pub fn agent_env_with(
        &self,
        overrides: &[(&'static str, &str)],
    ) -> Vec<(&'static str, String)> {
        let mut vars = self.agent_env();
        vars.retain(|(k, _)| !overrides.iter().any(|(o, _)| o == k));
        vars.extend(overrides.iter().map(|(k, v)| (*k, v.to_string())));
        vars
    }

    /// A projected service-account token for `ns/sa`, valid for an hour.
    pub fn jwt(&self, ns: &str, sa: &str) -> String {
        self.issuer.mint(ns, sa, Duration::from_secs(3600))
    }

    /// How many Vault requests hit `path` (from the audit log).
    pub fn count(&self, path: &str) -> usize {
        self.bao.audit_requests(path)
    }
}

//! OpenBao configured as the Istio "Vault CA" tutorial configures it: the PKI
//! mount and role, the policy, and the `kubernetes` and `jwt` auth methods
//! with the role that binds a certificate to a service account; and the
//! changes tests make to the role afterwards.

use super::Bao;
use std::time::Duration;

use anyhow::anyhow;
use reqwest::Method;
use serde_json::json;

use super::super::k8s::{TestIssuer, DEFAULT_AUDIENCE};

use super::{AUTH_ROLE, PKI_MOUNT, PKI_ROLE, POLICY};

/// Options for [`setup_tutorial_with`].
#[derive(Clone, Debug)]
pub struct TutorialOptions {
    /// `kubernetes_host`: the TokenReview server URL.
    pub token_review_url: String,
    pub trust_domain: String,
    /// Service accounts the `istio-cert` auth roles accept.
    pub sa_names: Vec<String>,
    pub sa_namespaces: Vec<String>,
    /// Bind the URI SAN to the login's SA (templated `allowed_uri_sans`)
    /// instead of accepting any `spiffe://*`.
    pub bind_uri_to_sa: bool,
    /// PKI role `ttl` / `max_ttl`, e.g. "1h" / "24h".
    pub cert_ttl: String,
    pub cert_max_ttl: String,
    /// Vault token TTL of logins, e.g. "1h".
    pub token_ttl: String,
    /// Kubernetes role `audience` (sent in the TokenReview when set).
    pub k8s_audience: Option<String>,
    /// JWT role `bound_audiences`.
    pub jwt_audiences: Vec<String>,
    /// Set everything up inside this (new) namespace instead of the root.
    pub namespace: Option<String>,
    /// PKI role `no_store` (certificates not stored: a standby signs itself).
    pub no_store: bool,
    /// Auth roles' `token_type` (`service`, `batch`), when set.
    pub token_type: Option<String>,
}

impl TutorialOptions {
    pub fn new(token_review_url: &str, trust_domain: &str) -> Self {
        Self {
            token_review_url: token_review_url.to_string(),
            trust_domain: trust_domain.to_string(),
            sa_names: vec!["httpbin".into(), "sleep".into()],
            sa_namespaces: vec!["default".into()],
            bind_uri_to_sa: false,
            cert_ttl: "1h".into(),
            cert_max_ttl: "24h".into(),
            token_ttl: "1h".into(),
            k8s_audience: None,
            jwt_audiences: vec![DEFAULT_AUDIENCE.into()],
            namespace: None,
            no_store: false,
            token_type: None,
        }
    }
}

/// What [`setup_tutorial`] created.
#[derive(Clone, Debug)]
pub struct TutorialSetup {
    /// Root CA PEM of the PKI mount's default issuer.
    pub root_pem: String,
    /// Mount accessors (`auth_kubernetes_…`, `auth_jwt_…`), used by identity
    /// templates.
    pub k8s_accessor: String,
    pub jwt_accessor: String,
}

/// [`setup_tutorial_with`] with defaults: SAs `httpbin` and `sleep` in
/// `default`, any `spiffe://*` URI SAN, 1h certs and tokens.
pub async fn setup_tutorial(
    bao: &Bao,
    issuer: &TestIssuer,
    token_review_url: &str,
    trust_domain: &str,
) -> anyhow::Result<TutorialSetup> {
    setup_tutorial_with(
        bao,
        issuer,
        &TutorialOptions::new(token_review_url, trust_domain),
    )
    .await
}

/// Configures `bao` as the Istio Vault tutorial does, through the HTTP API.
pub async fn setup_tutorial_with(
    bao: &Bao,
    issuer: &TestIssuer,
    o: &TutorialOptions,
) -> anyhow::Result<TutorialSetup> {
    use Method as M;
    if let Some(ns) = &o.namespace {
        bao.root(M::POST, &format!("sys/namespaces/{ns}"), None)
            .await?;
        *bao.namespace.lock().unwrap() = Some(ns.clone());
    }
    bao.root(
        M::POST,
        &format!("sys/mounts/{PKI_MOUNT}"),
        Some(json!({ "type": "pki", "config": { "max_lease_ttl": "87600h" } })),
    )
    .await?;
    let root = bao
        .root(
            M::POST,
            &format!("{PKI_MOUNT}/root/generate/internal"),
            Some(
                json!({ "common_name": "istio-ca.test", "issuer_name": "root-0", "ttl": "87600h" }),
            ),
        )
        .await?;
    let root_pem = root["data"]["certificate"]
        .as_str()
        .ok_or_else(|| anyhow!("no root certificate"))?
        .to_string();

    bao.root(
        M::POST,
        "sys/auth/kubernetes",
        Some(json!({ "type": "kubernetes" })),
    )
    .await?;
    bao.root(M::POST, "sys/auth/jwt", Some(json!({ "type": "jwt" })))
        .await?;
    let auths = bao.root(M::GET, "sys/auth", None).await?;
    let accessor = |m: &str| -> anyhow::Result<String> {
        auths["data"][m]["accessor"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("no accessor for {m}"))
    };
    let (k8s_accessor, jwt_accessor) = (accessor("kubernetes/")?, accessor("jwt/")?);

    let td = &o.trust_domain;
    let allowed_uri_sans = if o.bind_uri_to_sa {
        // One template per auth method: a template whose accessor is not the
        // login's cannot render and so allows nothing.
        [&k8s_accessor, &jwt_accessor]
            .iter()
            .map(|a| {
                format!(
                    "spiffe://{td}/ns/{{{{identity.entity.aliases.{a}.metadata.service_account_namespace}}}}\
                     /sa/{{{{identity.entity.aliases.{a}.metadata.service_account_name}}}}"
                )
            })
            .collect::<Vec<_>>()
    } else {
        vec!["spiffe://*".to_string()]
    };
    bao.root(
        M::POST,
        &format!("{PKI_MOUNT}/roles/{PKI_ROLE}"),
        Some(json!({
            "allow_any_name": true,
            "require_cn": false,
            "allowed_uri_sans": allowed_uri_sans,
            "allowed_uri_sans_template": o.bind_uri_to_sa,
            "use_csr_sans": true,
            "use_csr_common_name": false,
            "enforce_hostnames": false,
            "key_type": "any",
            // Leaves with basicConstraints (cA=false): X509-SVIDs, which
            // SPIFFE clients of the Workload API require.
            "basic_constraints_valid_for_non_ca": true,
            "ttl": o.cert_ttl,
            "max_ttl": o.cert_max_ttl,
            "no_store": o.no_store,
        })),
    )
    .await?;
    bao.root(
        M::POST,
        &format!("sys/policies/acl/{POLICY}"),
        Some(json!({
            "policy": format!(
                "path \"{PKI_MOUNT}/sign/{PKI_ROLE}\" {{\n  capabilities = [\"create\", \"update\"]\n}}\n"
            )
        })),
    )
    .await?;

    bao.root(
        M::POST,
        "auth/kubernetes/config",
        Some(json!({
            "kubernetes_host": o.token_review_url,
            // Required with disable_local_ca_jwt even for http://; unused then.
            "kubernetes_ca_cert": root_pem,
            "disable_local_ca_jwt": true,
            "token_reviewer_jwt": issuer.mint("kube-system", "vault-auth", Duration::from_secs(86400 * 365)),
        })),
    )
    .await?;
    let mut k8s_role = json!({
        "bound_service_account_names": o.sa_names,
        "bound_service_account_namespaces": o.sa_namespaces,
        "token_policies": [POLICY],
        "token_ttl": o.token_ttl,
    });
    if let Some(aud) = &o.k8s_audience {
        k8s_role["audience"] = json!(aud);
    }
    if let Some(t) = &o.token_type {
        k8s_role["token_type"] = json!(t);
    }
    bao.root(
        M::POST,
        &format!("auth/kubernetes/role/{AUTH_ROLE}"),
        Some(k8s_role),
    )
    .await?;

    bao.root(
        M::POST,
        "auth/jwt/config",
        Some(json!({ "jwt_validation_pubkeys": [issuer.public_key_pem()] })),
    )
    .await?;
    bao.root(
        M::POST,
        &format!("auth/jwt/role/{AUTH_ROLE}"),
        Some(json!({
            "role_type": "jwt",
            "user_claim": "sub",
            "bound_audiences": o.jwt_audiences,
            "bound_claims": { "sub": subjects(&o.sa_names, &o.sa_namespaces) },
            // Same alias metadata keys as the kubernetes method, so the same
            // URI template shape works for both.
            "claim_mappings": {
                "/kubernetes.io/namespace": "service_account_namespace",
                "/kubernetes.io/serviceaccount/name": "service_account_name",
            },
            "token_policies": [POLICY],
            "token_ttl": o.token_ttl,
            "token_type": o.token_type.as_deref().unwrap_or("default"),
        })),
    )
    .await?;
    Ok(TutorialSetup {
        root_pem,
        k8s_accessor,
        jwt_accessor,
    })
}

fn subjects<S: AsRef<str>>(names: &[S], namespaces: &[S]) -> Vec<String> {
    namespaces
        .iter()
        .flat_map(|ns| {
            names
                .iter()
                .map(move |sa| format!("system:serviceaccount:{}:{}", ns.as_ref(), sa.as_ref()))
        })
        .collect()
}

/// Rebinds the kubernetes `istio-cert` role to other service accounts.
pub async fn set_k8s_role_accounts(
    bao: &Bao,
    names: &[&str],
    namespaces: &[&str],
) -> anyhow::Result<()> {
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{AUTH_ROLE}"),
        Some(json!({
            "bound_service_account_names": names,
            "bound_service_account_namespaces": namespaces,
        })),
    )
    .await
    .map(drop)
}

/// Rebinds the jwt `istio-cert` role (its `sub` claim) to other accounts.
/// A jwt role update is a full replace (omitted fields reset, `role_type`
/// falls back to `oidc`), hence read-modify-write.
pub async fn set_jwt_role_accounts(
    bao: &Bao,
    names: &[&str],
    namespaces: &[&str],
) -> anyhow::Result<()> {
    let path = format!("auth/jwt/role/{AUTH_ROLE}");
    let mut role = bao.root(Method::GET, &path, None).await?["data"].take();
    role["bound_claims"] = json!({ "sub": subjects(names, namespaces) });
    bao.root(Method::POST, &path, Some(role)).await.map(drop)
}

/// Limits the tutorial's PKI role to other URI SANs (`allowed_uri_sans`),
/// keeping the rest: a PKI role update replaces every field, hence
/// read-modify-write.
pub async fn set_pki_role_uri_sans(bao: &Bao, allowed: &[&str]) -> anyhow::Result<()> {
    let path = format!("{PKI_MOUNT}/roles/{PKI_ROLE}");
    let mut role = bao.root(Method::GET, &path, None).await?["data"].take();
    role["allowed_uri_sans"] = json!(allowed);
    bao.root(Method::POST, &path, Some(role)).await.map(drop)
}

//! The login side: the auth method (`kubernetes` or `jwt`), its
//! configuration, and the role node-agent logs in with. Both methods leave
//! the same alias metadata (`service_account_namespace`,
//! `service_account_name`) on the login's entity, which the PKI role's URI
//! SAN template reads.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use zeroize::Zeroizing;

use super::client::{SetupError, VaultAdmin};
use super::desired::{Desired, Want};
use super::object::Object;
use super::plan::read_file;
use super::report::{Outcome, Report};
use super::{Args, AuthMethod};

/// JSON pointers of the service account in a projected service-account
/// token, and the alias metadata keys the kubernetes method sets for them.
const NAMESPACE_CLAIM: &str = "/kubernetes.io/namespace";
const NAME_CLAIM: &str = "/kubernetes.io/serviceaccount/name";
const NAMESPACE_META: &str = "service_account_namespace";
const NAME_META: &str = "service_account_name";

/// How Vault checks a workload's JWT.
pub enum AuthSpec {
    Kubernetes {
        host: String,
        ca_cert: Option<String>,
        reviewer_jwt: Option<Zeroizing<String>>,
        replace_reviewer_jwt: bool,
        audience: Option<String>,
    },
    Jwt {
        pubkeys: Vec<String>,
        discovery_url: Option<String>,
        discovery_ca: Option<String>,
        issuer: Option<String>,
        audience: String,
    },
}

/// The auth role.
pub struct RoleSpec {
    pub name: String,
    pub policy: String,
    pub namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub token_ttl: Duration,
    pub token_type: &'static str,
    /// The PKI role's max_ttl (for the settings printed).
    pub max_ttl: Duration,
}

impl AuthSpec {
    pub fn from_args(a: &Args) -> Result<Self, SetupError> {
        let not_for = |flag: &str, given: bool| -> Result<(), SetupError> {
            if given {
                Err(SetupError::usage(
                    flag,
                    format!("does not apply to --auth-method {}", a.auth_method.as_str()),
                ))
            } else {
                Ok(())
            }
        };
        match a.auth_method {
            AuthMethod::Kubernetes => {
                not_for(
                    "--jwt-validation-pubkeys",
                    a.jwt_validation_pubkeys.is_some(),
                )?;
                not_for("--oidc-discovery-url", a.oidc_discovery_url.is_some())?;
                not_for("--jwt-issuer", a.jwt_issuer.is_some())?;
                let host = a.kubernetes_host.clone().ok_or_else(|| {
                    SetupError::usage(
                        "--kubernetes-host",
                        "required with --auth-method kubernetes: the kube-apiserver URL Vault sends TokenReviews to",
                    )
                })?;
                let ca_cert = match &a.kubernetes_ca_cert {
                    Some(p) => {
                        let pem = read_file("--kubernetes-ca-cert", p)?;
                        crate::crypto::split_pem_certs(&pem).map_err(|e| {
                            SetupError::usage(format!("--kubernetes-ca-cert {}", p.display()), e)
                        })?;
                        Some(pem.trim().to_string())
                    }
                    None => None,
                };
                let reviewer_jwt = match &a.token_reviewer_jwt {
                    Some(p) => {
                        let jwt = Zeroizing::new(
                            read_file("--token-reviewer-jwt", p)?.trim().to_string(),
                        );
                        if jwt.split('.').count() != 3 {
                            return Err(SetupError::usage(
                                format!("--token-reviewer-jwt {}", p.display()),
                                "does not hold a JWT",
                            ));
                        }
                        Some(jwt)
                    }
                    None => None,
                };
                Ok(AuthSpec::Kubernetes {
                    host: host.trim().to_string(),
                    ca_cert,
                    reviewer_jwt,
                    replace_reviewer_jwt: a.replace_token_reviewer_jwt,
                    audience: a.audience.clone(),
                })
            }
            AuthMethod::Jwt => {
                not_for("--kubernetes-host", a.kubernetes_host.is_some())?;
                not_for("--kubernetes-ca-cert", a.kubernetes_ca_cert.is_some())?;
                not_for("--token-reviewer-jwt", a.token_reviewer_jwt.is_some())?;
                let pubkeys = match &a.jwt_validation_pubkeys {
                    Some(p) => public_keys(p)?,
                    None => Vec::new(),
                };
                if pubkeys.is_empty() && a.oidc_discovery_url.is_none() {
                    return Err(SetupError::usage(
                        "--jwt-validation-pubkeys or --oidc-discovery-url",
                        "one is required with --auth-method jwt: how Vault checks the JWTs' signatures",
                    ));
                }
                let audience = a.audience.clone().ok_or_else(|| {
                    SetupError::usage(
                        "--audience",
                        "required with --auth-method jwt: the `aud` of the workloads' projected tokens \
                         (e.g. https://kubernetes.default.svc.cluster.local)",
                    )
                })?;
                let discovery_ca = match &a.oidc_discovery_ca_cert {
                    Some(p) => Some(read_file("--oidc-discovery-ca-cert", p)?.trim().to_string()),
                    None => None,
                };
                Ok(AuthSpec::Jwt {
                    pubkeys,
                    discovery_url: a.oidc_discovery_url.clone(),
                    discovery_ca,
                    issuer: a.jwt_issuer.clone(),
                    audience,
                })
            }
        }
    }

    fn method(&self) -> &'static str {
        match self {
            AuthSpec::Kubernetes { .. } => "kubernetes",
            AuthSpec::Jwt { .. } => "jwt",
        }
    }
}

/// The `PUBLIC KEY` blocks of a PEM file, one string each.
fn public_keys(path: &std::path::Path) -> Result<Vec<String>, SetupError> {
    let text = read_file("--jwt-validation-pubkeys", path)?;
    let what = format!("--jwt-validation-pubkeys {}", path.display());
    let mut keys = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let label = block["-----BEGIN ".len()..]
            .split("-----")
            .next()
            .unwrap_or_default();
        if label != "PUBLIC KEY" {
            return Err(SetupError::usage(
                &what,
                format!("holds a {label:?} block; only PUBLIC KEY blocks (SubjectPublicKeyInfo) are accepted"),
            ));
        }
        let end_marker = "-----END PUBLIC KEY-----";
        let end = block
            .find(end_marker)
            .ok_or_else(|| SetupError::usage(&what, "a PUBLIC KEY block has no END line"))?;
        keys.push(block[..end + end_marker.len()].to_string());
        rest = &block[end + end_marker.len()..];
    }
    if keys.is_empty() {
        return Err(SetupError::usage(&what, "holds no PEM PUBLIC KEY"));
    }
    Ok(keys)
}

/// The auth method as found or made.
pub struct Method {
    /// Its mount accessor (unknown in a dry run that would create it).
    pub accessor: Option<String>,
    /// Created by this run.
    pub fresh: bool,
}

fn find(table: &serde_json::Value, path: &str) -> Option<serde_json::Value> {
    let table = if table["data"].is_object() {
        &table["data"]
    } else {
        table
    };
    table.get(format!("{path}/")).cloned()
}

/// The auth method at `path` in the `sys/auth` table, checked to be of the
/// wanted type; `None` when there is none.
pub fn existing_method(
    table: &serde_json::Value,
    path: &str,
    spec: &AuthSpec,
) -> Result<Option<serde_json::Value>, SetupError> {
    let Some(m) = find(table, path) else {
        return Ok(None);
    };
    let found = m["type"].as_str().unwrap_or("unknown");
    if found != spec.method() {
        return Err(SetupError::WrongType {
            what: "an auth method",
            path: format!("auth/{path}"),
            found: found.into(),
            wanted: spec.method(),
            flag: "--auth-path",
        });
    }
    Ok(Some(m))
}

pub async fn ensure_method(
    v: &VaultAdmin,
    report: &mut Report,
    path: &str,
    existing: Option<&serde_json::Value>,
    spec: &AuthSpec,
) -> Result<Method, SetupError> {
    let kind = spec.method();
    let what = format!("auth method {kind} at auth/{path}/");
    if let Some(m) = existing {
        report.item(Outcome::Unchanged, &what, "");
        return Ok(Method {
            accessor: m["accessor"].as_str().map(String::from),
            fresh: false,
        });
    }
    let body = json!({ "type": kind, "description": "mesh workloads (node-agent vault-setup)" });
    v.write(&format!("sys/auth/{path}"), &body, &body).await?;
    report.item(Outcome::Created, &what, "");
    let accessor = if v.dry_run() {
        None
    } else {
        let auths = v.read("sys/auth").await?.unwrap_or_default();
        let accessor = find(&auths, path).and_then(|m| m["accessor"].as_str().map(String::from));
        Some(accessor.ok_or_else(|| {
            SetupError::Conflict(format!(
                "auth/{path}/ was enabled but sys/auth does not list its accessor"
            ))
        })?)
    };
    Ok(Method {
        accessor,
        fresh: true,
    })
}

pub async fn ensure_config(
    v: &VaultAdmin,
    report: &mut Report,
    path: &str,
    spec: &AuthSpec,
    fresh: bool,
) -> Result<Outcome, SetupError> {
    let (desired, rewrite) = match spec {
        AuthSpec::Kubernetes {
            host,
            ca_cert,
            reviewer_jwt,
            replace_reviewer_jwt,
            ..
        } => (
            Desired::new()
                .str("kubernetes_host", host.as_str())
                .str("kubernetes_ca_cert", ca_cert.clone().unwrap_or_default())
                // With a reviewer JWT given, Vault uses it (and the CA given)
                // rather than the files of its own pod.
                .bool("disable_local_ca_jwt", reviewer_jwt.is_some())
                .with(
                    "token_reviewer_jwt",
                    Want::WriteOnly {
                        value: reviewer_jwt.as_ref().map(|j| j.to_string()),
                        set_flag: "token_reviewer_jwt_set",
                    },
                ),
            *replace_reviewer_jwt,
        ),
        AuthSpec::Jwt {
            pubkeys,
            discovery_url,
            discovery_ca,
            issuer,
            ..
        } => {
            let mut d = Desired::new();
            if pubkeys.is_empty() {
                d = d
                    .str(
                        "oidc_discovery_url",
                        discovery_url.clone().unwrap_or_default(),
                    )
                    .str(
                        "oidc_discovery_ca_pem",
                        discovery_ca.clone().unwrap_or_default(),
                    );
            } else {
                d = d.list("jwt_validation_pubkeys", pubkeys);
            }
            (
                d.str("bound_issuer", issuer.clone().unwrap_or_default()),
                false,
            )
        }
    };
    Object {
        what: format!("auth config auth/{path}/config"),
        path: format!("auth/{path}/config"),
        desired: &desired,
        fresh,
        rewrite_secrets: rewrite,
    }
    .ensure(v, report)
    .await
}

pub async fn ensure_role(
    v: &VaultAdmin,
    report: &mut Report,
    path: &str,
    spec: &AuthSpec,
    role: &RoleSpec,
    fresh: bool,
) -> Result<Outcome, SetupError> {
    let desired = match spec {
        AuthSpec::Kubernetes { audience, .. } => Desired::new()
            .list("bound_service_account_names", &role.service_accounts)
            .list("bound_service_account_namespaces", &role.namespaces)
            .str("audience", audience.clone().unwrap_or_default()),
        AuthSpec::Jwt { audience, .. } => Desired::new()
            .str("role_type", "jwt")
            .str("user_claim", "sub")
            .list("bound_audiences", std::slice::from_ref(audience))
            .str("bound_claims_type", "glob")
            .with(
                "bound_claims",
                Want::ListMap(BTreeMap::from([
                    (NAMESPACE_CLAIM.to_string(), role.namespaces.clone()),
                    (NAME_CLAIM.to_string(), role.service_accounts.clone()),
                ])),
            )
            .with(
                "claim_mappings",
                Want::StrMap(BTreeMap::from([
                    (NAMESPACE_CLAIM.to_string(), NAMESPACE_META.to_string()),
                    (NAME_CLAIM.to_string(), NAME_META.to_string()),
                ])),
            ),
    }
    .list("token_policies", std::slice::from_ref(&role.policy))
    // Without Vault's `default` policy a workload's token may do only what
    // the policy above grants (not look itself up, use cubbyhole, ...).
    .bool("token_no_default_policy", true)
    .with("token_ttl", Want::Duration(role.token_ttl))
    .with("token_max_ttl", Want::Duration(role.token_ttl))
    .str("token_type", role.token_type);
    Object {
        what: format!("auth role auth/{path}/role/{}", role.name),
        path: format!("auth/{path}/role/{}", role.name),
        desired: &desired,
        fresh,
        rewrite_secrets: false,
    }
    .ensure(v, report)
    .await
}

//! The PKI role that signs workload CSRs into X509-SVIDs, and the policy
//! that allows a workload's token exactly that.

use std::time::Duration;

use super::client::{SetupError, VaultAdmin};
use super::desired::{Desired, Want};
use super::object::Object;
use super::report::{Outcome, Report};

/// The URI SAN template that binds a certificate to the service account of
/// the login: Vault fills it in from the login's entity alias of the auth
/// mount `accessor` (both `kubernetes` and the `jwt` role's claim_mappings
/// set these metadata keys).
pub fn uri_san_template(trust_domain: &str, accessor: &str) -> String {
    let alias = format!("identity.entity.aliases.{accessor}.metadata");
    format!(
        "spiffe://{trust_domain}/ns/{{{{{alias}.service_account_namespace}}}}/sa/{{{{{alias}.service_account_name}}}}"
    )
}

/// What the PKI role holds: it signs CSRs whose only SAN is the caller's
/// own SPIFFE ID, into X509-SVIDs.
fn role_desired(trust_domain: &str, accessor: &str, max_ttl: Duration) -> Desired {
    Desired::new()
        .list(
            "allowed_uri_sans",
            &[uri_san_template(trust_domain, accessor)],
        )
        .bool("allowed_uri_sans_template", true)
        // No other name of any kind.
        .bool("allow_any_name", false)
        .bool("allow_localhost", false)
        .bool("allow_bare_domains", false)
        .bool("allow_subdomains", false)
        .bool("allow_glob_domains", false)
        .bool("allow_wildcard_certificates", false)
        .bool("allow_ip_sans", false)
        .list::<&str>("allowed_domains", &[])
        .list::<&str>("allowed_other_sans", &[])
        .bool("require_cn", false)
        .bool("use_csr_common_name", false)
        .bool("use_csr_sans", true)
        .str("key_type", "any")
        // Leaves carry basicConstraints (cA=false), as an X509-SVID must:
        // SPIFFE clients (the Workload API's) refuse a leaf without it.
        .bool("basic_constraints_valid_for_non_ca", true)
        // An X509-SVID's key usage is digitalSignature alone. Vault's
        // default adds KeyAgreement and KeyEncipherment, and an EC key must
        // not carry keyEncipherment (RFC 8813): certificate linters refuse it.
        .list("key_usage", &["DigitalSignature"])
        .list("ext_key_usage", &["ServerAuth", "ClientAuth"])
        .bool("server_flag", true)
        .bool("client_flag", true)
        .bool("no_store", true)
        .with("max_ttl", Want::Duration(max_ttl))
        .str("issuer_ref", "default")
}

/// The PKI role (see [`role_desired`]).
#[allow(clippy::too_many_arguments)]
pub async fn ensure_role(
    v: &VaultAdmin,
    report: &mut Report,
    pki: &str,
    role: &str,
    trust_domain: &str,
    accessor: Option<&str>,
    max_ttl: Duration,
    mount_fresh: bool,
) -> Result<Outcome, SetupError> {
    let accessor = accessor.unwrap_or("<accessor of the auth method, known once it is enabled>");
    let desired = role_desired(trust_domain, accessor, max_ttl);
    Object {
        what: format!("PKI role {pki}/roles/{role}"),
        path: format!("{pki}/roles/{role}"),
        desired: &desired,
        fresh: mount_fresh,
        rewrite_secrets: false,
    }
    .ensure(v, report)
    .await
}

/// The text of the policy: `update` on the sign path and on
/// `auth/token/revoke-self`, nothing else: all a workload's token is used
/// for (logins and the mount's issuers need no token), since the auth role
/// leaves out Vault's `default` policy, which would grant revoke-self.
pub fn policy_text(sign_path: &str) -> String {
    format!(
        "# node-agent: a workload's token may only have its CSR signed by the mesh PKI role,\n\
         # and revoke itself when the agent no longer needs it.\n\
         path \"{sign_path}\" {{\n  capabilities = [\"update\"]\n}}\n\
         path \"auth/token/revoke-self\" {{\n  capabilities = [\"update\"]\n}}\n"
    )
}

pub async fn ensure_policy(
    v: &VaultAdmin,
    report: &mut Report,
    name: &str,
    sign_path: &str,
) -> Result<Outcome, SetupError> {
    let desired = Desired::new().str("policy", policy_text(sign_path));
    Object {
        what: format!("policy {name}"),
        path: format!("sys/policies/acl/{name}"),
        desired: &desired,
        fresh: false,
        rewrite_secrets: false,
    }
    .ensure(v, report)
    .await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn template_names_both_alias_fields() {
        assert_eq!(
            uri_san_template("cluster.local", "auth_kubernetes_1"),
            "spiffe://cluster.local/ns/{{identity.entity.aliases.auth_kubernetes_1.metadata.service_account_namespace}}\
             /sa/{{identity.entity.aliases.auth_kubernetes_1.metadata.service_account_name}}"
        );
    }

    #[test]
    fn a_role_with_vaults_default_key_usage_differs_in_it() {
        let desired = role_desired("cluster.local", "auth_jwt_1", Duration::from_secs(3600));
        let mut role = desired.body();
        assert!(desired.diff(&role).is_empty(), "the role as written");
        // As Vault reads back a role written without key_usage and ext_key_usage.
        role["key_usage"] = json!(["DigitalSignature", "KeyAgreement", "KeyEncipherment"]);
        role["ext_key_usage"] = json!([]);
        role["max_ttl"] = json!(3600);
        let changes = desired.diff(&role);
        let shown: Vec<String> = changes
            .iter()
            .map(|c| format!("{}: {} -> {}", c.field, c.from, c.to))
            .collect();
        assert_eq!(
            shown,
            [
                "key_usage: [DigitalSignature, KeyAgreement, KeyEncipherment] -> [DigitalSignature]",
                "ext_key_usage: [] -> [ServerAuth, ClientAuth]",
            ]
        );
    }

    #[test]
    fn policy_allows_only_signing_and_revoking_itself() {
        let p = policy_text("istio_ca/sign/istio-pki-role");
        assert!(
            p.contains("path \"istio_ca/sign/istio-pki-role\" {\n  capabilities = [\"update\"]")
        );
        assert!(p.contains("path \"auth/token/revoke-self\" {\n  capabilities = [\"update\"]"));
        assert_eq!(p.matches("path ").count(), 2);
        assert_eq!(p.matches("capabilities").count(), 2);
    }
}

//! Changes to the PKI mount's CAs: a root rotation (a new root made the
//! default issuer), and a mount holding only an intermediate signed by the
//! tutorial's root.

use super::Bao;

use anyhow::anyhow;
use reqwest::Method;
use serde_json::json;

use super::{PKI_MOUNT, PKI_ROLE, POLICY};

/// Rotates the PKI mount's root as Vault's documentation describes it:
/// `root/rotate/internal` makes a new root issuer, and `config/issuers`
/// makes it the default, so later signs chain to it. The old issuer stays
/// (certificates it issued remain verifiable, and the mount still lists it).
/// Returns the new root PEM.
pub async fn rotate_root(bao: &Bao) -> anyhow::Result<String> {
    Ok(rotate_root_issuer(bao).await?.1)
}

/// [`rotate_root`], also returning the new issuer's ID.
pub async fn rotate_root_issuer(bao: &Bao) -> anyhow::Result<(String, String)> {
    let name = format!("root-{}", rand::random::<u32>());
    let new = bao
        .root(
            Method::POST,
            &format!("{PKI_MOUNT}/root/rotate/internal"),
            Some(json!({ "common_name": "istio-ca.test", "issuer_name": name, "ttl": "87600h" })),
        )
        .await?;
    let id = new["data"]["issuer_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no issuer_id"))?
        .to_string();
    bao.root(
        Method::POST,
        &format!("{PKI_MOUNT}/config/issuers"),
        Some(json!({ "default": id })),
    )
    .await?;
    let pem = new["data"]["certificate"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow!("no certificate"))?;
    Ok((id, pem))
}

/// Makes `mount` a PKI mount holding only an intermediate CA signed by the
/// root of [`PKI_MOUNT`], with a role like the tutorial's. With
/// `with_root`, the root is imported into the mount too (as an issuer
/// without key); otherwise the mount does not know its root. With
/// `chain_self`, the intermediate's `manual_chain` is itself only, so sign
/// answers carry no root even when the mount lists one. Returns the
/// intermediate's PEM.
pub async fn setup_intermediate(
    bao: &Bao,
    mount: &str,
    with_root: bool,
    chain_self: bool,
) -> anyhow::Result<String> {
    use Method as M;
    bao.root(
        M::POST,
        &format!("sys/mounts/{mount}"),
        Some(json!({ "type": "pki", "config": { "max_lease_ttl": "8760h" } })),
    )
    .await?;
    let csr = bao
        .root(
            M::POST,
            &format!("{mount}/intermediate/generate/internal"),
            Some(json!({ "common_name": format!("{mount} intermediate") })),
        )
        .await?["data"]["csr"]
        .as_str()
        .ok_or_else(|| anyhow!("no intermediate CSR"))?
        .to_string();
    let int_pem = bao
        .root(
            M::POST,
            &format!("{PKI_MOUNT}/root/sign-intermediate"),
            Some(json!({ "csr": csr, "format": "pem", "ttl": "4000h" })),
        )
        .await?["data"]["certificate"]
        .as_str()
        .ok_or_else(|| anyhow!("no intermediate certificate"))?
        .to_string();
    let set = bao
        .root(
            M::POST,
            &format!("{mount}/intermediate/set-signed"),
            Some(json!({ "certificate": int_pem })),
        )
        .await?;
    let int_id = set["data"]["imported_issuers"][0]
        .as_str()
        .ok_or_else(|| anyhow!("no imported issuer"))?
        .to_string();
    if with_root {
        let url = format!("{}/v1/{PKI_MOUNT}/ca/pem", bao.addr());
        let root = bao.client().get(url).send().await?.text().await?;
        bao.root(
            M::POST,
            &format!("{mount}/issuers/import/cert"),
            Some(json!({ "pem_bundle": root })),
        )
        .await?;
    }
    if chain_self {
        bao.root(
            M::POST,
            &format!("{mount}/issuer/{int_id}"),
            Some(json!({ "manual_chain": ["self"] })),
        )
        .await?;
    }
    bao.root(
        M::POST,
        &format!("{mount}/roles/{PKI_ROLE}"),
        Some(json!({
            "allow_any_name": true,
            "require_cn": false,
            "allowed_uri_sans": ["spiffe://*"],
            "use_csr_sans": true,
            "use_csr_common_name": false,
            "enforce_hostnames": false,
            "key_type": "any",
            "basic_constraints_valid_for_non_ca": true,
            "ttl": "1h",
        })),
    )
    .await?;
    // The tutorial's token policy may sign with the role of any mount.
    bao.root(
        M::POST,
        &format!("sys/policies/acl/{POLICY}"),
        Some(json!({
            "policy": format!(
                "path \"+/sign/{PKI_ROLE}\" {{\n  capabilities = [\"create\", \"update\"]\n}}\n"
            )
        })),
    )
    .await?;
    Ok(int_pem)
}

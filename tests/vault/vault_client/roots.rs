//! The roots the client trusts: every root the PKI mount lists, through a
//! rotation and in a Vault namespace; and a chain Vault returns without its
//! root, completed from the mount or refused.

use crate::support;

use std::time::SystemTime;

use node_agent::ca::{CaClient, CaError};
use node_agent::crypto::{split_pem_certs, verify_issued};
use node_agent::identity::Credential;
use reqwest::Method;
use serde_json::json;
use support::bao::{rotate_root_issuer, setup_intermediate, PKI_MOUNT};
use support::vault_env::VaultEnv;

use super::{csr, id, vault_ca, HOUR};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_roots_are_every_root_the_mount_lists_through_a_rotation() {
    let env = VaultEnv::start().await;
    // Checked against OpenBao 2.7: the issuer list and PEMs need no token.
    for path in [format!("{PKI_MOUNT}/issuers?list=true")] {
        let (status, _) = env.bao.call(Method::GET, &path, None, None).await.unwrap();
        assert_eq!(status, 200, "{path} without a token");
    }
    let ca = vault_ca(&env.agent_env());
    let root0 = split_pem_certs(&env.setup.root_pem).unwrap();
    assert_eq!(ca.trust_roots().await.unwrap(), root0);

    // Vault's documented rotation: a new root, made the default issuer.
    let old_id = env
        .bao
        .call(
            Method::GET,
            &format!("{PKI_MOUNT}/issuers?list=true"),
            None,
            None,
        )
        .await
        .unwrap()
        .1["data"]["keys"][0]
        .as_str()
        .unwrap()
        .to_string();
    let (_, root1) = rotate_root_issuer(&env.bao).await.unwrap();
    let root1 = split_pem_certs(&root1).unwrap();
    let both = ca.trust_roots().await.unwrap();
    assert_eq!(both.len(), 2, "both roots while the old one is listed");
    assert!(both.contains(&root0[0]) && both.contains(&root1[0]));
    // New certificates chain to the new root.
    let auth = ca
        .login(&Credential::new(env.jwt("default", "httpbin")))
        .await
        .unwrap();
    let chain = ca.sign(&auth, &csr("httpbin").0, HOUR).await.unwrap();
    assert_eq!(chain.roots_pem, root1);

    // A root the mount lists but that has expired is not trusted.
    env.bao
        .root(
            Method::POST,
            &format!("{PKI_MOUNT}/issuers/import/cert"),
            Some(json!({ "pem_bundle": expired_root() })),
        )
        .await
        .unwrap();
    let listed = ca.trust_roots().await.unwrap();
    assert_eq!(listed.len(), 2, "the expired root is left out");

    // The operator deletes the old issuer: it is no longer a trusted root.
    env.bao
        .root(
            Method::DELETE,
            &format!("{PKI_MOUNT}/issuer/{old_id}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ca.trust_roots().await.unwrap(), root1);
    // No token was used to read them.
    let reads: Vec<_> = env
        .bao
        .audited_requests()
        .into_iter()
        .filter(|e| {
            e["request"]["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(&format!("{PKI_MOUNT}/issuer")))
                && matches!(e["request"]["operation"].as_str(), Some("read" | "list"))
        })
        .collect();
    assert!(!reads.is_empty());
    for r in reads {
        assert!(
            r["auth"]["client_token"].as_str().unwrap_or("").is_empty(),
            "{r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_roots_are_read_in_the_vault_namespace() {
    let env = VaultEnv::start_opts(|o| o.namespace = Some("team".into())).await;
    let ca = vault_ca(&env.agent_env());
    assert_eq!(
        ca.trust_roots().await.unwrap(),
        split_pem_certs(&env.setup.root_pem).unwrap()
    );
    // Without the namespace the mount does not exist.
    let mut vars = env.agent_env();
    vars.retain(|(k, _)| *k != "VAULT_NAMESPACE");
    let err = vault_ca(&vars).trust_roots().await.unwrap_err();
    assert!(
        err.message()
            .contains("cannot read the roots of the PKI mount istio_ca"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_without_its_root_is_completed_from_the_mount_or_refused() {
    let env = VaultEnv::start().await;
    let root = split_pem_certs(&env.setup.root_pem).unwrap();
    setup_intermediate(&env.bao, "int_alone", false, false)
        .await
        .unwrap();
    setup_intermediate(&env.bao, "int_self", true, true)
        .await
        .unwrap();
    setup_intermediate(&env.bao, "int_full", true, false)
        .await
        .unwrap();
    let jwt = Credential::new(env.jwt("default", "httpbin"));
    let sign_with = |mount: &str| {
        let vars = env.agent_env_with(&[(
            "VAULT_SIGN_CSR_PATH",
            &format!("{mount}/sign/istio-pki-role"),
        )]);
        vault_ca(&vars)
    };

    // The mount knows only its intermediate: refused, saying how to fix it.
    let ca = sign_with("int_alone");
    let auth = ca.login(&jwt).await.unwrap();
    assert!(ca.trust_roots().await.unwrap().is_empty());
    let err = ca.sign(&auth, &csr("httpbin").0, HOUR).await.unwrap_err();
    assert!(matches!(err, CaError::BadAnswer(_)), "{err:?}");
    assert!(
        err.message().contains("lists no root that issued it")
            && err.message().contains("int_alone/issuers/import/cert"),
        "{}",
        err.message()
    );

    // The answer carries no root (manual_chain=self) but the mount lists it.
    for mount in ["int_self", "int_full"] {
        let ca = sign_with(mount);
        let auth = ca.login(&jwt).await.unwrap();
        let (csr_pem, key) = csr("httpbin");
        let chain = ca
            .sign(&auth, &csr_pem, HOUR)
            .await
            .unwrap_or_else(|e| panic!("{mount}: {e}"));
        assert_eq!(
            chain.roots_pem, root,
            "{mount}: the root, not the intermediate"
        );
        assert_eq!(chain.chain_pem.len(), 2, "{mount}: leaf and intermediate");
        verify_issued(
            &chain,
            &key.public_key_der(),
            &id("httpbin"),
            SystemTime::now(),
        )
        .unwrap_or_else(|e| panic!("{mount}: {e}"));
        assert_eq!(ca.trust_roots().await.unwrap(), root, "{mount}");
    }
}

/// A self-signed root that expired yesterday.
fn expired_root() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "expired root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(10);
    p.not_after = now - time::Duration::days(1);
    p.self_signed(&key).unwrap().pem()
}

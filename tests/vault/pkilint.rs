//! What the agent serves from an OpenBao set up by `node-agent vault-setup`
//! passes DigiCert's RFC 5280 linter, pkilint (see `support::pkilint`):
//! the generated root, and the leaf its PKI role signs, for an EC P-256
//! mount and workload key and for an RSA-2048 one, one agent each. Vault's
//! default role key usage (with keyEncipherment) makes the EC leaf an ERROR
//! (RFC 8813); vault-setup's role sets key_usage=["DigitalSignature"].

use crate::support;

use std::path::PathBuf;
use std::time::Duration;

use support::agent::Agent;
use support::bao::Bao;
use support::cli::{node_agent, settings, write};
use support::k8s::DEFAULT_AUDIENCE;
use support::pkilint::{assert_accepts, served_files};
use support::vault_env::issuer;

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_setup_leaves_and_roots_pass_pkilint() {
    let issuer = issuer();
    let bao = Bao::start_plain().await.expect("start OpenBao");
    let dir = tempfile::tempdir().unwrap();
    let pubkey = write(dir.path(), "sa-signer.pub", &issuer.public_key_pem());
    let token = write(
        dir.path(),
        "token",
        &issuer.mint("default", "httpbin", Duration::from_secs(3600)),
    );
    let vault = [
        ("VAULT_ADDR", bao.addr()),
        ("VAULT_TOKEN", bao.root_token().to_string()),
    ];
    // The jwt method (no TokenReview stand-in needed); each key type gets its
    // own mount, root, policy and auth role, as an operator would set up two.
    let mut agents: Vec<(&str, Agent, PathBuf)> = Vec::new();
    for (key_type, own) in [
        ("ec-p256", vec![]),
        (
            "rsa-2048",
            vec![
                "--pki-path",
                "istio_ca_rsa",
                "--root-key-type",
                "rsa-2048",
                "--policy",
                "istio-cert-rsa-policy",
                "--auth-role",
                "istio-cert-rsa",
            ],
        ),
    ] {
        let mut args = vec![
            "vault-setup",
            "--auth-method",
            "jwt",
            "--jwt-validation-pubkeys",
            &pubkey,
            "--audience",
            DEFAULT_AUDIENCE,
            "--bound-namespaces",
            "default",
            "--bound-service-accounts",
            "httpbin",
        ];
        args.extend(own);
        let setup = node_agent(&args, &vault).await;
        assert_eq!(setup.code, 0, "{}", setup.both());
        let home = dir.path().join(key_type);
        let mut env: Vec<(String, String)> = settings(&setup.stdout);
        env.extend([
            ("KEY_TYPE".into(), key_type.into()),
            ("WORKLOAD_TOKEN_PATH".into(), token.clone()),
            (
                "OUTPUT_CERTS".into(),
                home.join("certs").display().to_string(),
            ),
        ]);
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let agent = Agent::spawn(&home.join("sds.sock"), dir.path(), &env);
        agents.push((key_type, agent, home));
    }
    for (key_type, agent, home) in &agents {
        let (chain, root) =
            tokio::task::block_in_place(|| served_files(agent, &home.join("certs")));
        assert_accepts(&format!("Vault {key_type}"), home, &root, &chain, SPIFFE_ID);
        assert!(
            !agent.log().contains("breaks X.509-SVID rules"),
            "vault-setup's role makes valid X509-SVIDs:\n{}",
            agent.log()
        );
    }
}

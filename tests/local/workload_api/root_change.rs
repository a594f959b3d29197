//! A root change in Vault reaches the Workload API's open stream (the new
//! bundle, and an SVID chaining to it) and the certificate files the agent
//! writes, without the workload asking again.

use crate::support;

use std::time::Duration;

use spiffe::{TrustDomain, WorkloadApiClient};
use support::agent::Agent;
use support::bao::{rotate_root, PKI_MOUNT, PKI_ROLE};
use tokio_stream::StreamExt;
use x509_parser::prelude::*;

use super::{endpoint, verify};

/// DER of the certificates in a PEM text.
fn pem_ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|b| b.unwrap().contents)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_root_change_reaches_the_open_stream_and_the_files() {
    let env = support::vault_env::VaultEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, env.jwt("default", "httpbin")).unwrap();
    // A PKI role written without basic_constraints_valid_for_non_ca (as
    // Istio's Vault tutorial writes it, and roles made before vault-setup
    // set it) has Vault leave basicConstraints out of leaves.
    let path = format!("{PKI_MOUNT}/roles/{PKI_ROLE}");
    let set_basic_constraints = |on: bool| {
        let (bao, path) = (&env.bao, path.clone());
        async move {
            let mut role =
                bao.root(reqwest::Method::GET, &path, None).await.unwrap()["data"].take();
            role["basic_constraints_valid_for_non_ca"] = serde_json::json!(on);
            bao.root(reqwest::Method::POST, &path, Some(role))
                .await
                .unwrap();
        }
    };
    set_basic_constraints(false).await;
    let api_socket = dir.path().join("api.sock");
    let out = dir.path().join("certs");
    let vars = env.agent_env_with(&[
        ("SECRET_TTL", "10s"),
        ("WORKLOAD_TOKEN_PATH", &token.display().to_string()),
        ("WORKLOAD_API_SOCKET", &api_socket.display().to_string()),
        ("OUTPUT_CERTS", &out.display().to_string()),
    ]);
    let agent = Agent::start_at(&dir.path().join("sds.sock"), dir.path(), &vars);
    agent.wait_log("SPIFFE Workload API server start", Duration::from_secs(10));
    let client = WorkloadApiClient::connect_to(endpoint(&api_socket))
        .await
        .unwrap();

    // SPIFFE clients refuse such a leaf; the agent says so and names the
    // role setting.
    let err = client.fetch_x509_svid().await.map(|_| ()).unwrap_err();
    assert!(
        format!("{err:?}").contains("2.5.29.19"),
        "the spiffe crate refuses a leaf without basicConstraints: {err:?}"
    );
    agent.wait_log(
        "basic_constraints_valid_for_non_ca=true",
        Duration::from_secs(5),
    );
    // With the role fixed, the next certificate (10 s lifetime, renewed at
    // about 5 s) is a valid X509-SVID.
    set_basic_constraints(true).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.fetch_x509_svid().await {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "still refused after the role was fixed: {e:?}\n{}",
                agent.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    verify(first.default_svid().unwrap(), first.bundle_set());

    let new_root = pem_ders(&rotate_root(&env.bao).await.unwrap()).remove(0);
    let td = TrustDomain::new("cluster.local").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("the new root never reached the stream\n{}", agent.log()))
            .expect("the stream stays open")
            .unwrap();
        // Every message verifies: the SVID against the bundle sent with it.
        verify(ctx.default_svid().unwrap(), ctx.bundle_set());
        let bundle = ctx.bundle_set().get(&td).unwrap();
        if bundle
            .authorities()
            .iter()
            .any(|a| a.as_bytes() == new_root)
        {
            let last = ctx
                .default_svid()
                .unwrap()
                .cert_chain()
                .last()
                .unwrap()
                .as_bytes()
                .to_vec();
            let (_, last) = X509Certificate::from_der(&last).unwrap();
            let (_, root) = X509Certificate::from_der(&new_root).unwrap();
            if last.verify_signature(Some(root.public_key())).is_ok() {
                break; // an SVID of the new root, with the new root
            }
        }
    }
    // The files follow: root-cert.pem holds the new root, and the chain in
    // cert-chain.pem is signed by it.
    loop {
        let roots = std::fs::read_to_string(out.join("root-cert.pem")).unwrap();
        let chain = pem_ders(&std::fs::read_to_string(out.join("cert-chain.pem")).unwrap());
        let (_, last) = X509Certificate::from_der(chain.last().unwrap()).unwrap();
        let (_, root) = X509Certificate::from_der(&new_root).unwrap();
        if pem_ders(&roots).contains(&new_root)
            && last.verify_signature(Some(root.public_key())).is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the files never got the new root\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.log().contains("wrote the certificate files"));

    // The role keeps Vault's default key_usage, so every leaf of the EC key
    // also broke the X.509-SVID rule against keyEncipherment: one warning
    // for the first leaf (naming both role settings), one more when the
    // rules broken changed with the role, none at the renewals between.
    let log = agent.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("breaks X.509-SVID rules"))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    let key_usage = r#"key_usage=["DigitalSignature"]"#;
    assert!(
        warnings[0].contains("basic_constraints_valid_for_non_ca=true")
            && warnings[0].contains(key_usage),
        "{}",
        warnings[0]
    );
    assert!(
        !warnings[1].contains("basicConstraints") && warnings[1].contains(key_usage),
        "{}",
        warnings[1]
    );
}

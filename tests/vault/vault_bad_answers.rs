//! A Vault that answers garbage, or a real certificate for another key, is
//! refused with a clear log line and nothing is served. A small tampering
//! front sits between the agent and a real OpenBao: logins pass through, and
//! sign answers are replaced. A genuine leaf that could sign certificates
//! (a role's key_usage with CertSign) is refused too.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::sds_client::*;
use support::vault_env::VaultEnv;
use support::vault_front::{Tamper, VaultFront};
use tonic::Code;

async fn refused(mode: Tamper, expect: &str) {
    let env = VaultEnv::start().await;
    let front = VaultFront::start(
        env.bao.addr(),
        env.bao.client().clone(),
        mode,
        Duration::ZERO,
    )
    .await
    .url;
    let mut vars: Vec<(&str, String)> = env
        .agent_env()
        .into_iter()
        .filter(|(k, _)| !matches!(*k, "VAULT_ADDR" | "CA_ADDR" | "VAULT_TLS_ROOT_CERT"))
        .collect();
    vars.push(("VAULT_ADDR", front.clone()));
    let agent = Agent::start(&vars);
    let mut client = connect(&agent.socket).await;
    let err = fetch(
        &mut client,
        &["default", "ROOTCA"],
        &env.jwt("default", "httpbin"),
    )
    .await
    .expect_err("a bad answer must not be served");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains(expect), "{}", err.message());
    agent.wait_log(
        "Failed to sign cert for \"default,ROOTCA\": ",
        Duration::from_secs(5),
    );
    agent.wait_log(expect, Duration::from_secs(5));
    assert!(
        agent.log().contains(&format!("Vault at {front}")),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_vault_is_refused() {
    refused(Tamper::Garbage, "The answer is not JSON").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_a_certificate_is_refused() {
    refused(Tamper::NoCertificate, "no data.certificate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_key_is_refused() {
    refused(
        Tamper::OtherKey,
        "the certificate is not for the key this agent generated; not served",
    )
    .await;
}

/// A PKI role whose key_usage adds CertSign has Vault sign leaves that could
/// sign certificates: refused as no X.509-SVID, naming the rule and the
/// role setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_that_could_sign_certificates_is_refused() {
    use support::bao::{PKI_MOUNT, PKI_ROLE};
    let env = VaultEnv::start().await;
    let path = format!("{PKI_MOUNT}/roles/{PKI_ROLE}");
    let mut role = env
        .bao
        .root(reqwest::Method::GET, &path, None)
        .await
        .unwrap()["data"]
        .take();
    role["key_usage"] = serde_json::json!(["DigitalSignature", "CertSign"]);
    env.bao
        .root(reqwest::Method::POST, &path, Some(role))
        .await
        .unwrap();
    let agent = Agent::start(&env.agent_env());
    let mut client = connect(&agent.socket).await;
    let err = fetch(&mut client, &["default"], &env.jwt("default", "httpbin"))
        .await
        .expect_err("a leaf with keyCertSign must not be served");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    let expect = "returned a certificate that is not an X.509-SVID: its keyUsage has keyCertSign \
                  (with Vault, set key_usage=[\"DigitalSignature\"] on the PKI role); not served";
    assert!(err.message().contains(expect), "{}", err.message());
    agent.wait_log(expect, Duration::from_secs(5));
}

//! The Vault CA against a real OpenBao, configured as the Istio Vault
//! tutorial configures Istio's Node Agent: Envoys doing mTLS on Vault's
//! certificates; a service account the role does not accept, or a JWT Vault
//! rejects, gets nothing (even when its identity is cached); the `jwt` auth
//! method; the Vault namespace on every call; and an agent with no CA
//! configured stopping with a message naming the two choices.
//! Vault down, hanging or refusing is in [`outages`]; streams cancelled
//! while Vault refuses connections in [`cancels`]; SIGTERM while Vault
//! hangs and the tokens revoked at shutdown in [`shutdown`].

use crate::support;

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use support::agent::Agent;
use support::bao::set_k8s_role_accounts;
use support::envoy::*;
use support::mesh::{Mesh, CLIENT_ID, SERVER_ID};
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tokio_stream::StreamExt;
use tonic::Code;

mod cancels;
mod forged_churn;
mod outages;
mod shutdown;

/// A `default` + `ROOTCA` response carries `id`'s certificate and the PKI
/// mount's root.
fn assert_issued_by_the_pki(resp: &DiscoveryResponse, id: &str, env: &VaultEnv) {
    let s = secrets(resp);
    assert_eq!(leaf_facts(&tls_certificate(&s[0]).0).0, [id]);
    assert_eq!(
        serial_of(&trusted_ca(&s[1])),
        serial_of(&env.setup.root_pem)
    );
}

fn serial_of(pem: &str) -> String {
    leaf_facts(pem).1.replace(':', "").to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_scenario_envoys_do_mtls_on_vault_certificates() {
    let env = VaultEnv::start().await;
    let agent = Agent::started(&env.agent_env()).await;
    let mesh = Mesh::start(
        &agent.socket,
        &env.jwt("default", "httpbin"),
        &env.jwt("default", "sleep"),
        "httpbin says hi",
        || agent.log(),
    )
    .await;
    let server = &mesh.server;

    let resp = mesh.get().await;
    assert_eq!(resp.status(), 200, "agent:\n{}", agent.log());
    assert_eq!(resp.headers()[HDR_SERVER_SAW_CLIENT_URI], CLIENT_ID);
    assert_eq!(resp.text().await.unwrap(), "httpbin says hi");

    // The server Envoy's /certs: its SPIFFE ID, trusting the PKI mount's root.
    let certs = server.certs().await;
    assert!(
        cert_uris(&certs).contains(&SERVER_ID.to_string()),
        "{certs}"
    );
    let root_serial = serial_of(&env.setup.root_pem);
    assert!(
        cert_serials(&certs)
            .iter()
            .any(|s| s.replace(':', "").to_lowercase() == root_serial),
        "the trusted CA is the PKI mount's root {root_serial}: {certs}"
    );
    // One login per distinct JWT, one sign per identity, whatever the streams.
    assert_eq!(
        env.count("auth/kubernetes/login"),
        2,
        "agent:\n{}",
        agent.log()
    );
    assert_eq!(env.count("istio_ca/sign/istio-pki-role"), 2);
    assert!(agent.log().contains("Vault CA configured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_service_account_gets_nothing_until_the_role_accepts_it() {
    let env = VaultEnv::start().await;
    let agent = Agent::started(&env.agent_env()).await;
    let mut client = connect(&agent.socket).await;
    let intruder = env.jwt("default", "intruder");

    let err = fetch(&mut client, &["default"], &intruder)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("service account name not authorized"),
        "{}",
        err.message()
    );
    let vault = env.agent_addr();
    agent.log_shows(
        &format!("failed to login Vault: Error making API request. URL: POST {vault}/v1/auth/kubernetes/login Code: 403. Errors: * service account name not authorized"),
        Duration::from_secs(5),
    ).await;
    agent.log_shows(
        &format!("Failed to sign cert for \"default\": failed to login Vault at {vault}: Error making API request."),
        Duration::from_secs(5),
    ).await;
    assert_eq!(
        env.count("istio_ca/sign/istio-pki-role"),
        0,
        "no sign for a rejected login"
    );

    // Nothing else is disturbed.
    let ok = fetch(
        &mut client,
        &["default", "ROOTCA"],
        &env.jwt("default", "httpbin"),
    )
    .await
    .expect("an accepted workload is served");
    assert_eq!(served_uris(&ok), [SERVER_ID]);

    // A stream for the intruder, opened now, ends with the same reason.
    let (tx, mut inbound) = open_stream(&mut client, &intruder).await;
    tx.send(request(&["default"], None)).await.unwrap();
    let err = inbound.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The operator fixes the role: the workload is served without any
    // restart. It retries on a new connection each time, as a reconnecting
    // Envoy does: a JWT the CA rejected spends its connection's budget at
    // every try.
    set_k8s_role_accounts(&env.bao, &["httpbin", "sleep", "intruder"], &["default"])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let resp = loop {
        let mut client = connect(&agent.socket).await;
        match fetch(&mut client, &["default"], &intruder).await {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(e.code(), Code::PermissionDenied);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never healed: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert_eq!(
        served_uris(&resp),
        ["spiffe://cluster.local/ns/default/sa/intruder"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_vault_rejects_gets_nothing_even_when_the_identity_is_cached() {
    let env = VaultEnv::start().await;
    let agent = Agent::started(&env.agent_env()).await;
    let mut client = connect(&agent.socket).await;
    fetch(&mut client, &["default"], &env.jwt("default", "httpbin"))
        .await
        .expect("the real workload is served and cached");

    // Same claims, signed by another key: Vault refuses it, so it gets nothing.
    let forger = support::k8s::TestIssuer::generate().unwrap();
    let forged = forger.mint("default", "httpbin", Duration::from_secs(3600));
    for names in [&["default"][..], &["ROOTCA"][..]] {
        let err = fetch(&mut client, names, &forged).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{names:?}: {err:?}");
        assert!(
            err.message().contains("permission denied"),
            "{}",
            err.message()
        );
    }
    // The Vault token cached for the real JWT was not used for the forged one.
    assert_eq!(env.count("istio_ca/sign/istio-pki-role"), 1);
    assert!(!agent.log().contains(&forged), "the JWT must not be logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_method_pem_text_root_and_login_caching() {
    let env = VaultEnv::start().await;
    let mut vars: Vec<(&str, String)> = env
        .agent_env()
        .into_iter()
        .filter(|(k, _)| *k != "VAULT_AUTH_PATH" && *k != "VAULT_TLS_ROOT_CERT")
        .collect();
    vars.push(("VAULT_AUTH_PATH", "auth/jwt/login".into()));
    vars.push((
        "VAULT_TLS_ROOT_CERT",
        std::fs::read_to_string(env.bao.ca_pem_path()).unwrap(),
    ));
    let agent = Agent::started(&vars).await;
    let mut client = connect(&agent.socket).await;
    let jwt = env.jwt("default", "sleep");
    for _ in 0..3 {
        let resp = fetch(&mut client, &["default", "ROOTCA"], &jwt)
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
        assert_issued_by_the_pki(&resp, CLIENT_ID, &env);
    }
    assert_eq!(env.count("auth/jwt/login"), 1, "one login per distinct JWT");
    assert_eq!(
        env.count("istio_ca/sign/istio-pki-role"),
        1,
        "one sign per identity"
    );
    // A second JWT for the same identity is proven by its own login.
    let second = env
        .issuer
        .mint("default", "sleep", Duration::from_secs(1800));
    fetch(&mut client, &["default"], &second).await.unwrap();
    assert_eq!(env.count("auth/jwt/login"), 2);
    assert_eq!(env.count("istio_ca/sign/istio-pki-role"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_namespace_is_sent_with_every_call() {
    // Everything lives in the OpenBao namespace `team`: without the header the
    // login path does not exist, with VAULT_NAMESPACE it works.
    let env = VaultEnv::start_opts(|o| o.namespace = Some("team".into())).await;
    let jwt = env.jwt("default", "httpbin");

    let agent = Agent::started(&env.agent_env()).await;
    let mut client = connect(&agent.socket).await;
    let resp = fetch(&mut client, &["default", "ROOTCA"], &jwt)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
    assert_issued_by_the_pki(&resp, SERVER_ID, &env);
    // What Vault recorded: each of the agent's calls came in the namespace.
    let calls: Vec<serde_json::Value> = env
        .bao
        .audited_requests()
        .into_iter()
        .filter(|e| {
            let p = e["request"]["path"].as_str().unwrap_or("");
            p == "auth/kubernetes/login" || p == "istio_ca/sign/istio-pki-role"
        })
        .collect();
    assert_eq!(calls.len(), 2, "one login, one sign: {calls:?}");
    for c in &calls {
        assert_eq!(c["request"]["namespace"]["path"], "team/", "{c}");
    }

    let mut vars = env.agent_env();
    vars.retain(|(k, _)| *k != "VAULT_NAMESPACE");
    let outside = Agent::started(&vars).await;
    let mut client = connect(&outside.socket).await;
    let err = fetch(&mut client, &["default"], &jwt)
        .await
        .expect_err("the root namespace has no kubernetes auth");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("auth/kubernetes/login Code: "),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn no_ca_configured_stops_the_agent_naming_the_two_choices() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(&dir.path().join("uds"), dir.path(), &[]);
    let st = agent.exited(Duration::from_secs(20)).await;
    assert_eq!(st.code(), Some(2), "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("CA_PROVIDER=VaultCA with VAULT_ADDR")
            && log.contains("CA_PROVIDER=LocalCA for development"),
        "{log}"
    );
    assert!(!dir.path().join("uds").exists(), "nothing was served");
}

//! The Vault CA against a real OpenBao, configured as the Istio Vault
//! tutorial configures Istio's Node Agent.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use support::agent::Agent;
use support::bao::{set_k8s_role_accounts, ProxyMode};
use support::envoy::*;
use support::mesh::{Mesh, CLIENT_ID, SERVER_ID};
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tokio_stream::StreamExt;
use tonic::Code;

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
    let agent = Agent::start(&env.agent_env());
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
    let agent = Agent::start(&env.agent_env());
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
    agent.wait_log(
        &format!("failed to login Vault: Error making API request. URL: POST {vault}/v1/auth/kubernetes/login Code: 403. Errors: * service account name not authorized"),
        Duration::from_secs(5),
    );
    agent.wait_log(
        &format!("Failed to sign cert for \"default\": failed to login Vault at {vault}: Error making API request."),
        Duration::from_secs(5),
    );
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

    // The operator fixes the role: the workload is served without any restart.
    set_k8s_role_accounts(&env.bao, &["httpbin", "sleep", "intruder"], &["default"])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let resp = loop {
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
    let agent = Agent::start(&env.agent_env());
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
    let agent = Agent::start(&vars);
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

/// A stream opened while Vault is unusable (`mode`) waits, retrying with
/// back-off (the log shows `failure`), and is served once Vault answers.
async fn waiting_stream_is_served_once_vault_answers(
    mode: ProxyMode,
    overrides: &[(&'static str, &str)],
    failure: &str,
) {
    let env = VaultEnv::start().await.with_proxy(mode).await;
    let agent = Agent::start(&env.agent_env_with(overrides));
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &env.jwt("default", "httpbin")).await;
    tx.send(request(&["default"], None)).await.unwrap();
    agent.wait_log(failure, Duration::from_secs(20));
    agent.wait_log("retrying in", Duration::from_secs(20));
    env.proxy.as_ref().unwrap().set_mode(ProxyMode::Up).await;
    let resp = next_within(
        &mut inbound,
        Duration::from_secs(30),
        "no certificate after Vault answered again",
        || agent.log(),
    )
    .await
    .unwrap();
    assert_eq!(served_uris(&resp), [SERVER_ID]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_at_start_then_up_serves_the_waiting_stream() {
    waiting_stream_is_served_once_vault_answers(ProxyMode::Down, &[], "cannot connect").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_vault_times_out_and_is_retried() {
    waiting_stream_is_served_once_vault_answers(
        ProxyMode::Hang,
        &[("VAULT_REQUEST_TIMEOUT", "1s")],
        "timed out",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_envoy_heals_when_the_role_is_fixed_without_restarts() {
    let env = VaultEnv::start().await;
    let agent = Agent::start(&env.agent_env());
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("intruder-token");
    std::fs::write(&token, env.jwt("default", "intruder")).unwrap();
    let sds = SdsSource::GoogleGrpc {
        uds_path: agent.socket.clone(),
        token_file: token,
    };
    let envoy = start_client_envoy(sds, free_port(), free_port(), SERVER_ID)
        .await
        .unwrap();
    agent.wait_log(
        "service account name not authorized",
        Duration::from_secs(20),
    );
    assert!(
        envoy.wait_ready(Duration::from_secs(3)).await.is_err(),
        "no certificate for a refused workload"
    );
    assert!(cert_uris(&envoy.certs().await).is_empty());
    let logins_while_refused = env.count("auth/kubernetes/login");

    set_k8s_role_accounts(&env.bao, &["httpbin", "sleep", "intruder"], &["default"])
        .await
        .unwrap();
    envoy
        .wait_ready(Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\nagent:\n{}", agent.log()));
    assert!(cert_uris(&envoy.certs().await)
        .contains(&"spiffe://cluster.local/ns/default/sa/intruder".to_string()));
    // Envoy's reconnects were not passed to Vault one by one: at most one
    // login per hold-down period (5 s) while refused.
    assert!(
        logins_while_refused <= 3,
        "{logins_while_refused} logins within a few seconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_namespace_is_sent_with_every_call() {
    // Everything lives in the OpenBao namespace `team`: without the header the
    // login path does not exist, with VAULT_NAMESPACE it works.
    let env = VaultEnv::start_opts(|o| o.namespace = Some("team".into())).await;
    let jwt = env.jwt("default", "httpbin");

    let agent = Agent::start(&env.agent_env());
    assert!(env
        .agent_env()
        .contains(&("VAULT_NAMESPACE", "team".to_string())));
    let mut client = connect(&agent.socket).await;
    let resp = fetch(&mut client, &["default", "ROOTCA"], &jwt)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
    assert_issued_by_the_pki(&resp, SERVER_ID, &env);

    let mut vars = env.agent_env();
    vars.retain(|(k, _)| *k != "VAULT_NAMESPACE");
    let outside = Agent::start(&vars);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_not_held_up_by_a_hanging_vault() {
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Hang).await;
    let mut agent = Agent::start(&env.agent_env()); // 15 s request time-out
    let mut client = connect(&agent.socket).await;
    let (tx, _inbound) = open_stream(&mut client, &env.jwt("default", "sleep")).await;
    tx.send(request(&["default"], None)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = std::time::Instant::now();
    let st = agent.terminate();
    assert!(st.success(), "{}", agent.log());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(!agent.socket.exists());
}

//! The Vault CA against a real OpenBao, configured as the Istio Vault
//! tutorial configures Istio's Node Agent.

use crate::support;

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

/// A stream opened while Vault is unusable (`mode`) waits, retrying with
/// back-off (the log shows `failure`), and is served once Vault answers.
async fn waiting_stream_is_served_once_vault_answers(
    mode: ProxyMode,
    overrides: &[(&'static str, &str)],
    failure: &str,
) {
    let env = VaultEnv::start().await.with_proxy(mode).await;
    let agent = Agent::started(&env.agent_env_with(overrides)).await;
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &env.jwt("default", "httpbin")).await;
    tx.send(request(&["default"], None)).await.unwrap();
    agent.log_shows(failure, Duration::from_secs(20)).await;
    agent
        .log_shows("retrying in", Duration::from_secs(20))
        .await;
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
    let agent = Agent::started(&env.agent_env()).await;
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
    agent
        .log_shows(
            "service account name not authorized",
            Duration::from_secs(20),
        )
        .await;
    assert!(
        envoy.wait_ready(Duration::from_secs(3)).await.is_err(),
        "no certificate for a refused workload"
    );
    assert!(cert_uris(&envoy.certs().await).is_empty());

    set_k8s_role_accounts(&env.bao, &["httpbin", "sleep", "intruder"], &["default"])
        .await
        .unwrap();
    envoy
        .wait_ready(Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\nagent:\n{}", agent.log()));
    assert!(cert_uris(&envoy.certs().await)
        .contains(&"spiffe://cluster.local/ns/default/sa/intruder".to_string()));
}

/// A refused workload retries for `window` (a fetch every 100 ms, as a
/// reconnecting Envoy would); returns (attempts, requests to `path` Vault
/// saw during the window). Every attempt must be refused.
async fn requests_while_refused(
    env: &VaultEnv,
    agent: &Agent,
    jwt: &str,
    path: &str,
    window: Duration,
) -> (usize, usize) {
    let mut client = connect(&agent.socket).await;
    let before = env.count(path);
    let started = tokio::time::Instant::now();
    let mut attempts = 0;
    while started.elapsed() < window {
        let err = fetch(&mut client, &["default"], jwt)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        attempts += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (attempts, env.count(path) - before)
}

/// Vault is asked at most once per hold-down (5 s): in a window of 6 s, at
/// the start and once after 5 s.
const WINDOW: Duration = Duration::from_secs(6);
const MOST_PER_WINDOW: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_reaches_vault_once_per_hold_down() {
    let env = VaultEnv::start().await;
    let agent = Agent::started(&env.agent_env()).await;
    let jwt = env.jwt("default", "intruder");
    let (attempts, logins) =
        requests_while_refused(&env, &agent, &jwt, "auth/kubernetes/login", WINDOW).await;
    assert!(
        attempts >= 10,
        "only {attempts} attempts: the window proves nothing"
    );
    assert!(
        (1..=MOST_PER_WINDOW).contains(&logins),
        "{logins} logins for {attempts} refused attempts in {WINDOW:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sign_reaches_vault_once_per_hold_down() {
    let env = VaultEnv::start().await;
    // The login is accepted; the PKI role refuses every SPIFFE URI.
    support::bao::set_pki_role_uri_sans(&env.bao, &["spiffe://elsewhere/*"])
        .await
        .unwrap();
    let agent = Agent::started(&env.agent_env()).await;
    let jwt = env.jwt("default", "httpbin");
    let sign = "istio_ca/sign/istio-pki-role";
    let (attempts, signs) = requests_while_refused(&env, &agent, &jwt, sign, WINDOW).await;
    assert!(
        attempts >= 10,
        "only {attempts} attempts: the window proves nothing"
    );
    assert!(
        (1..=MOST_PER_WINDOW).contains(&signs),
        "{signs} signs for {attempts} refused attempts in {WINDOW:?}\n{}",
        agent.log()
    );
    // Vault's reason reaches the log, once per refusal Vault gave; the
    // repeats answered from memory are logged at debug.
    let errors = agent
        .log()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("URI Subject Alternative Names"))
        .count();
    assert!(
        (1..=signs).contains(&errors),
        "{errors} error lines for {signs} refusals:\n{}",
        agent.log()
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_not_held_up_by_a_hanging_vault() {
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Up).await;
    let mut agent = Agent::started(&env.agent_env()).await; // 15 s request time-out
    let mut client = connect(&agent.socket).await;
    // One workload is served: the agent holds its Vault token.
    fetch(&mut client, &["default"], &env.jwt("default", "httpbin"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
    let proxy = env.proxy.as_ref().unwrap();
    proxy.set_mode(ProxyMode::Hang).await;
    let (tx, mut inbound) = open_stream(&mut client, &env.jwt("default", "sleep")).await;
    tx.send(request(&["default"], None)).await.unwrap();
    // A request to Vault is in flight, unanswered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.hung_requests() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Vault request hangs\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), inbound.next())
            .await
            .is_err(),
        "the stream waits for Vault"
    );

    let t = std::time::Instant::now();
    agent.signal_term();
    let st = agent.exited(Duration::from_secs(15)).await;
    assert!(st.success(), "{}", agent.log());
    // Not the 15 s of the Vault request: the revocation of the cached token
    // (which hangs too) is cut at its budget (2 s).
    let limit = Duration::from_secs(4);
    assert!(
        t.elapsed() < limit,
        "shutdown took {:?}\n{}",
        t.elapsed(),
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("revoking the agent's Vault tokens took longer than"),
        "{}",
        agent.log()
    );
    assert!(!agent.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_revokes_the_agents_vault_tokens() {
    let env = VaultEnv::start().await;
    let mut agent = Agent::started(&env.agent_env()).await;
    let mut client = connect(&agent.socket).await;
    for sa in ["httpbin", "sleep"] {
        fetch(&mut client, &["default"], &env.jwt("default", sa))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
    }
    let revocations = || {
        env.bao
            .audited_requests()
            .iter()
            .filter(|e| {
                e["request"]["path"] == "auth/token/revoke-self"
                    && e["auth"]["display_name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("kubernetes-"))
            })
            .count()
    };
    assert_eq!(revocations(), 0);
    agent.signal_term();
    assert!(agent.exited(Duration::from_secs(15)).await.success());
    assert_eq!(revocations(), 2, "both tokens revoked\n{}", agent.log());
    assert!(
        agent.log().contains("revoked the agent's Vault tokens"),
        "{}",
        agent.log()
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

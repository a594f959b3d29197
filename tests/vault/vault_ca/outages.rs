//! Vault down, hanging or refusing: a waiting stream is served once Vault
//! answers (down at start, or hanging and timed out), a refused Envoy heals
//! when the role is fixed without restarts, and a refused login or sign
//! reaches Vault once per hold-down.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::bao::{set_k8s_role_accounts, ProxyMode};
use support::envoy::*;
use support::mesh::SERVER_ID;
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tonic::Code;

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

/// A refused workload retries for `window` (a fetch every 100 ms, each on a
/// new connection, as a reconnecting Envoy would: a JWT the CA rejected
/// spends its connection's budget at every try); returns (attempts,
/// requests to `path` Vault saw during the window). Every attempt must be
/// refused.
async fn requests_while_refused(
    env: &VaultEnv,
    agent: &Agent,
    jwt: &str,
    path: &str,
    window: Duration,
) -> (usize, usize) {
    let before = env.count(path);
    let started = tokio::time::Instant::now();
    let mut attempts = 0;
    while started.elapsed() < window {
        let mut client = connect(&agent.socket).await;
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

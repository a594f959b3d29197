//! The CAs the agent trusts for Vault's TLS: `VAULT_TLS_ROOT_CERT` replaces
//! the system roots (a certificate from a CA the host trusts, but not the
//! one named, is refused), and `VAULT_TLS_SYSTEM_ROOTS=true` adds them back.
//!
//! The "system roots" are made a CA of the test's through `SSL_CERT_FILE`,
//! which rustls-native-certs reads instead of the OS store; the first agent
//! shows that it does.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::cli::write;
use support::mesh::SERVER_ID;
use support::sds_client::{connect, fetch, served_uris};
use support::vault_env::VaultEnv;
use support::vault_front::{FrontOptions, TestCa, VaultFront};

/// The agent's settings for Vault at `url`, with `extra` (and no
/// `VAULT_TLS_ROOT_CERT` unless `extra` has one).
fn settings(
    env: &VaultEnv,
    url: &str,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut vars = env.agent_env();
    vars.retain(|(k, _)| !matches!(*k, "VAULT_ADDR" | "CA_ADDR" | "VAULT_TLS_ROOT_CERT"));
    vars.push(("VAULT_ADDR", url.to_string()));
    vars.extend(extra.iter().cloned());
    vars
}

/// Whether an agent with `vars` serves httpbin's certificate within `within`.
async fn fetch_within(env: &VaultEnv, agent: &Agent, within: Duration) -> Result<(), String> {
    let mut client = connect(&agent.socket).await;
    let jwt = env.jwt("default", "httpbin");
    match tokio::time::timeout(within, fetch(&mut client, &["default"], &jwt)).await {
        Ok(Ok(resp)) => {
            assert_eq!(served_uris(&resp), [SERVER_ID]);
            Ok(())
        }
        Ok(Err(status)) => Err(format!("refused: {status:?}")),
        Err(_) => Err(format!("nothing within {within:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_cert_replaces_the_system_roots_unless_they_are_added_back() {
    let env = VaultEnv::start().await;
    // Vault behind an HTTPS front whose certificate CA B issued.
    let ca_b = TestCa::named("test CA B");
    let front = VaultFront::start_with(
        env.bao.addr(),
        env.bao.client().clone(),
        FrontOptions {
            tls: Some(ca_b.clone()),
            ..FrontOptions::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let system = ("SSL_CERT_FILE", write(dir.path(), "b.pem", &ca_b.root_pem));
    let ca_a = write(dir.path(), "a.pem", &TestCa::named("test CA A").root_pem);
    let root_a = ("VAULT_TLS_ROOT_CERT", ca_a);

    // CA B as the only system root: trusted (SSL_CERT_FILE is read).
    let agent = Agent::started(&settings(&env, &front.url, std::slice::from_ref(&system))).await;
    fetch_within(&env, &agent, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("CA B as a system root: {e}\n{}", agent.log()));
    drop(agent);

    // VAULT_TLS_ROOT_CERT names CA A: CA B, though a system root, is not
    // trusted, and the log says what to do.
    let agent = Agent::started(&settings(
        &env,
        &front.url,
        &[system.clone(), root_a.clone()],
    ))
    .await;
    let failed = fetch_within(&env, &agent, Duration::from_secs(5)).await;
    assert!(failed.is_err(), "served with CA A only\n{}", agent.log());
    agent
        .log_shows(
            "Vault's TLS certificate is not trusted (invalid peer certificate: UnknownIssuer): only \
             the CAs in VAULT_TLS_ROOT_CERT are trusted, not the system roots: set \
             VAULT_TLS_ROOT_CERT to the CA that issued Vault's certificate, or \
             VAULT_TLS_SYSTEM_ROOTS=true to trust the system roots too",
            Duration::from_secs(10),
        )
        .await;
    drop(agent);

    // VAULT_TLS_SYSTEM_ROOTS=true adds them back.
    let agent = Agent::started(&settings(
        &env,
        &front.url,
        &[system, root_a, ("VAULT_TLS_SYSTEM_ROOTS", "true".into())],
    ))
    .await;
    fetch_within(&env, &agent, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("system roots added back: {e}\n{}", agent.log()));
}

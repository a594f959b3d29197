//! The agent's shutdown with Vault: SIGTERM is not held up by a hanging
//! Vault, and it revokes the agent's Vault tokens.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::bao::ProxyMode;
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tokio_stream::StreamExt;

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

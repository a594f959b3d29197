//! A stream is served no longer than the credential it was opened with,
//! against a real OpenBao (kubernetes auth, the TokenReview stand-in):
//!
//! - a JWT sent in the stream's metadata ends the stream when it expires,
//!   while a stream of the same identity with a live JWT is served on;
//! - a JWT Vault rejects at a renewal (its pod deleted) ends its stream with
//!   `PERMISSION_DENIED`, while the identity is renewed with another
//!   stream's JWT and that stream gets the new certificate;
//! - every renewal proves each stream's JWT to Vault again, though Vault's
//!   tokens are cached, so that a deleted pod's stream never receives a
//!   certificate issued after its JWT was refused;
//! - a stream reading `WORKLOAD_TOKEN_PATH` moves to the token kubelet puts
//!   in the file before the old one expires, and ends only when the file is
//!   left holding an expired token.

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use support::agent::Agent;
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tonic::Code;

/// The serial of the `default` certificate in a response.
fn serial(resp: &DiscoveryResponse) -> String {
    let pem = tls_certificate(&secrets(resp)[0]).0;
    leaf_facts(&pem).1
}

/// Opens a stream for `default` with `jwt` (none: the agent reads
/// `WORKLOAD_TOKEN_PATH`), ACKs its first response and returns it.
async fn served(
    agent: &Agent,
    jwt: Option<&str>,
) -> (
    tokio::sync::mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
    DiscoveryResponse,
) {
    let mut client = connect(&agent.socket).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(jwt) = jwt {
        req = with_jwt(req.into_inner(), jwt);
    }
    let mut inbound = client
        .stream_secrets(req)
        .await
        .expect("open StreamSecrets")
        .into_inner();
    tx.send(request(&["default"], None)).await.unwrap();
    let first = next_within(
        &mut inbound,
        Duration::from_secs(30),
        "first response",
        || agent.log(),
    )
    .await
    .expect("served");
    tx.send(request(&["default"], Some(&first))).await.unwrap();
    (tx, inbound, first)
}

/// Waits for a push whose serial differs from `old` on `inbound`, ACKing
/// what comes; panics with the agent's log otherwise.
async fn next_serial(
    agent: &Agent,
    tx: &tokio::sync::mpsc::Sender<DiscoveryRequest>,
    inbound: &mut tonic::Streaming<DiscoveryResponse>,
    old: &str,
    within: Duration,
) -> String {
    let end = Instant::now() + within;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let resp = next_within(inbound, left, "a renewed certificate", || agent.log())
            .await
            .unwrap_or_else(|s| panic!("the stream ended: {s:?}\n{}", agent.log()));
        tx.send(request(&["default"], Some(&resp))).await.unwrap();
        let s = serial(&resp);
        if s != old {
            return s;
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn write_token(path: &Path, token: &str) {
    // As kubelet does: the new token appears whole.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_jwt_expires_while_a_stream_with_a_live_jwt_is_served_on() {
    let env = VaultEnv::start().await;
    // Certificates of 6 s: renewed every ~3 s, so pushes keep coming.
    let agent = Agent::started(&env.agent_env_with(&[("SECRET_TTL", "6s")])).await;
    let short = env
        .issuer
        .mint("default", "httpbin", Duration::from_secs(6));
    let short_exp = unix_now() + 6;
    let long = env.jwt("default", "httpbin");
    let (_tx_s, mut short_stream, _) = served(&agent, Some(&short)).await;
    let (tx_l, mut long_stream, first) = served(&agent, Some(&long)).await;

    let end = next_within(
        &mut short_stream,
        Duration::from_secs(20),
        "the stream of the expiring JWT was not ended",
        || agent.log(),
    )
    .await;
    // Pushes before the end are fine; the end comes with its status.
    let mut end = end;
    while end.is_ok() {
        assert!(unix_now() <= short_exp + 1, "served after its JWT expired");
        end = next_within(&mut short_stream, Duration::from_secs(20), "end", || {
            agent.log()
        })
        .await;
    }
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status
            .message()
            .contains("the JWT this stream was opened with expired at"),
        "{}",
        status.message()
    );
    assert!(unix_now() >= short_exp, "ended before its JWT expired");
    assert!(agent.log().contains("ending the stream"), "{}", agent.log());

    // Positive control: the live JWT's stream gets the next certificate.
    let old = serial(&first);
    let mut newest = old.clone();
    for _ in 0..2 {
        newest = next_serial(
            &agent,
            &tx_l,
            &mut long_stream,
            &newest,
            Duration::from_secs(15),
        )
        .await;
    }
    assert_ne!(newest, old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_vault_rejects_at_renewal_ends_its_stream_and_the_identity_renews_with_another() {
    // Vault tokens live 2 s, so each renewal logs in again.
    let env = VaultEnv::start_opts(|o| o.token_ttl = "2s".into()).await;
    let agent = Agent::started(&env.agent_env_with(&[("SECRET_TTL", "8s")])).await;
    // The renewal tries the JWT that expires last first: the one to revoke.
    let gone = env
        .issuer
        .mint("default", "httpbin", Duration::from_secs(7200));
    let kept = env.jwt("default", "httpbin");
    let (_tx_g, mut gone_stream, _) = served(&agent, Some(&gone)).await;
    let (tx_k, mut kept_stream, first) = served(&agent, Some(&kept)).await;

    // The pod of `gone` is deleted: the API server refuses its token.
    env.review.revoke(&gone);
    let renewed = next_serial(
        &agent,
        &tx_k,
        &mut kept_stream,
        &serial(&first),
        Duration::from_secs(20),
    )
    .await;
    assert_ne!(renewed, serial(&first));

    let end = loop {
        match next_within(
            &mut gone_stream,
            Duration::from_secs(10),
            "the stream of the rejected JWT was not ended",
            || agent.log(),
        )
        .await
        {
            Ok(resp) => assert_ne!(
                serial(&resp),
                renewed,
                "the renewed certificate reached the rejected JWT's stream"
            ),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
    assert!(
        end.message()
            .contains("the CA no longer accepts the JWT this stream was opened with"),
        "{}",
        end.message()
    );
    assert!(
        agent
            .log()
            .contains("forgetting it and renewing with another"),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_renewal_proves_each_pods_jwt_again_though_vault_tokens_are_cached() {
    // Vault tokens outlive every renewal here: only a new login finds out
    // that a pod was deleted.
    let env = VaultEnv::start().await;
    let agent = Agent::started(&env.agent_env_with(&[("SECRET_TTL", "8s")])).await;
    // Two pods of one service account. The deleted one's JWT expires first,
    // so it is never the one a renewal signs with.
    let kept = env
        .issuer
        .mint("default", "httpbin", Duration::from_secs(7200));
    let gone = env.jwt("default", "httpbin");
    let (tx_k, mut kept_stream, first) = served(&agent, Some(&kept)).await;
    let (tx_g, mut gone_stream, _) = served(&agent, Some(&gone)).await;

    // A renewal while both pods live: both streams get it, after one login
    // per JWT.
    let logins = env.count("auth/kubernetes/login");
    let renewed = next_serial(
        &agent,
        &tx_k,
        &mut kept_stream,
        &serial(&first),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        env.count("auth/kubernetes/login") - logins,
        2,
        "one login per distinct JWT at the renewal"
    );
    let seen = next_serial(
        &agent,
        &tx_g,
        &mut gone_stream,
        &serial(&first),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(seen, renewed, "the live pod's stream is renewed too");

    // The pod of `gone` is deleted: the TokenReview stand-in refuses its JWT.
    env.review.revoke(&gone);
    let next = next_serial(
        &agent,
        &tx_k,
        &mut kept_stream,
        &renewed,
        Duration::from_secs(20),
    )
    .await;
    let end = loop {
        match next_within(
            &mut gone_stream,
            Duration::from_secs(10),
            "the stream of the deleted pod's JWT was not ended",
            || agent.log(),
        )
        .await
        {
            Ok(resp) => assert_ne!(
                serial(&resp),
                next,
                "a certificate issued after the refusal reached the deleted pod's stream"
            ),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
    // The deleted pod gets nothing by a new stream either.
    let mut client = connect(&agent.socket).await;
    let refused = client
        .fetch_secrets(with_jwt(request(&["default"], None), &gone))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_stream_moves_to_the_new_token_and_ends_only_when_the_file_holds_an_expired_one(
) {
    let env = VaultEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    // 10 s of life: read again a tenth of it (1 s) before exp.
    write_token(
        &token,
        &env.issuer
            .mint("default", "httpbin", Duration::from_secs(10)),
    );
    let old_exp = unix_now() + 10;
    let agent = Agent::started(&env.agent_env_with(&[
        ("SECRET_TTL", "6s"),
        ("WORKLOAD_TOKEN_PATH", &token.display().to_string()),
    ]))
    .await;
    let (tx, mut stream, first) = served(&agent, None).await;
    let logins = env.count("auth/kubernetes/login");

    // kubelet puts a new token in the file.
    write_token(&token, &env.jwt("default", "httpbin"));
    // Served past the old token's exp, with renewals.
    let mut newest = serial(&first);
    while unix_now() <= old_exp + 3 {
        newest = next_serial(&agent, &tx, &mut stream, &newest, Duration::from_secs(15)).await;
    }
    assert!(
        env.count("auth/kubernetes/login") > logins,
        "the new token was proven to Vault"
    );

    // Control: a file left holding a token that expires ends its stream.
    write_token(
        &token,
        &env.issuer
            .mint("default", "httpbin", Duration::from_secs(5)),
    );
    let expiring_exp = unix_now() + 5;
    let (_tx2, mut stream2, _) = served(&agent, None).await;
    let end = loop {
        match next_within(
            &mut stream2,
            Duration::from_secs(15),
            "the stream was not ended",
            || agent.log(),
        )
        .await
        {
            Ok(_) => assert!(
                unix_now() <= expiring_exp + 1,
                "served after the file's token expired\n{}",
                agent.log()
            ),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(
        end.message().contains("WORKLOAD_TOKEN_PATH") && end.message().contains("was not replaced"),
        "{}",
        end.message()
    );
}

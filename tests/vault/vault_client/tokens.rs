//! The client's Vault tokens and what Vault refuses: an expired JWT is refused
//! without asking Vault (its token going with it); refusals carry Vault's
//! status and errors; a revoked token is held down and replaced by one new
//! login; a sign the role refuses is asked once per hold-down; release and
//! shutdown revoke service tokens and leave batch ones.

use crate::support;

use std::time::{Duration, SystemTime};

use node_agent::ca::{CaClient, CaError};
use node_agent::crypto::verify_issued;
use node_agent::identity::{Credential, IdentityError};
use reqwest::Method;
use serde_json::json;
use support::vault_env::VaultEnv;

use super::{csr, id, vault_ca, HOUR, LOGIN, REVOKE_SELF, SIGN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_jwt_is_refused_without_asking_vault_and_its_token_goes_with_it() {
    let env = VaultEnv::start().await;
    let ca = vault_ca(&env.agent_env());
    // The token's lease is an hour; the JWT lives a few seconds.
    let jwt = Credential::new(
        env.issuer
            .mint("default", "httpbin", Duration::from_secs(3)),
    );
    ca.login(&jwt).await.expect("a live JWT logs in");
    assert!(
        ca.cached_login(&jwt).await.is_some(),
        "cached while the JWT lives"
    );
    assert_eq!(env.count(LOGIN), 1);

    let exp = jwt.claims().unwrap().expires_at.unwrap();
    let wait = exp - node_agent::clock::Clock::system().unix_now() + 1;
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;

    assert!(
        ca.cached_login(&jwt).await.is_none(),
        "a token is cached no longer than the JWT that earned it"
    );
    let err = ca.login(&jwt).await.expect_err("an expired JWT is refused");
    assert!(err.is_rejection() && !err.is_transient(), "{err:?}");
    assert!(
        matches!(err.credential_error(), Some(IdentityError::Expired { .. })),
        "{err:?}"
    );
    assert!(
        err.message().contains("refused without asking Vault"),
        "{}",
        err.message()
    );
    assert_eq!(env.count(LOGIN), 1, "Vault was not asked");
    // The token it earned (with most of its hour left) is revoked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while revocations(&env) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "never revoked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(revocations(&env), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_vault_status_and_errors_as_data() {
    let env = VaultEnv::start().await;
    let ca = vault_ca(&env.agent_env());
    let err = ca
        .login(&Credential::new(env.jwt("default", "intruder")))
        .await
        .expect_err("the role does not accept this account");
    assert!(matches!(err, CaError::Rejected(_)), "{err:?}");
    assert_eq!(err.status(), Some(403));
    assert_eq!(err.vault_errors(), ["service account name not authorized"]);
    // The tutorial's text, with Vault's own error verbatim.
    assert!(
        err.message()
            .contains("Code: 403. Errors: * service account name not authorized"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_held_down_and_replaced_by_one_new_login() {
    let env = VaultEnv::start().await;
    let ca = vault_ca(&env.agent_env());
    let jwt = Credential::new(env.jwt("default", "httpbin"));
    let first = ca.login(&jwt).await.unwrap();
    ca.sign(&first, &csr("httpbin").0, HOUR)
        .await
        .expect("signed");

    // Vault revokes every token of the kubernetes login (an operator, a rebuild).
    env.bao
        .root(
            Method::POST,
            "sys/leases/revoke-prefix/auth/kubernetes",
            None,
        )
        .await
        .unwrap();
    let err = ca.sign(&first, &csr("httpbin").0, HOUR).await.unwrap_err();
    assert!(err.is_token_refused(), "a fresh 403: {err:?}");
    assert_eq!(err.vault_errors(), ["permission denied"]);
    assert!(
        err.message().contains("refused to sign"),
        "{}",
        err.message()
    );
    // Repeats within the hold-down are answered from memory.
    let again = ca.sign(&first, &csr("httpbin").0, HOUR).await.unwrap_err();
    assert!(again.is_repeat() && !again.is_token_refused(), "{again:?}");
    assert_eq!(env.count(SIGN), 2, "one sign refused, the repeat not sent");
    // The cached token is still the dead one until the caller invalidates it.
    assert!(ca.cached_login(&jwt).await.is_some());

    ca.invalidate(&first);
    assert!(ca.cached_login(&jwt).await.is_none(), "dropped");
    let second = ca.login(&jwt).await.expect("a new login");
    assert_eq!(env.count(LOGIN), 2);
    let (csr_pem, key) = csr("httpbin");
    let chain = ca
        .sign(&second, &csr_pem, HOUR)
        .await
        .expect("the new token signs");
    verify_issued(
        &chain,
        &key.public_key_der(),
        &id("httpbin"),
        SystemTime::now(),
    )
    .unwrap();
    // Invalidating the old authorization again does not drop the new token.
    ca.invalidate(&first);
    assert!(ca.cached_login(&jwt).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_the_role_refuses_is_asked_once_per_hold_down() {
    let env = VaultEnv::start().await;
    let ca = vault_ca(&env.agent_env());
    let auth = ca
        .login(&Credential::new(env.jwt("default", "httpbin")))
        .await
        .unwrap();
    // The PKI role stops accepting SPIFFE URIs: the token is fine, the CSR is not.
    support::bao::set_pki_role_uri_sans(&env.bao, &["spiffe://elsewhere/*"])
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = ca.sign(&auth, &csr("httpbin").0, HOUR).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err:?}");
    assert!(err.is_rejection() && !err.is_token_refused() && !err.is_repeat());
    let mut repeats = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let e = ca.sign(&auth, &csr("httpbin").0, HOUR).await.unwrap_err();
        assert!(e.is_repeat(), "{e:?}");
        assert_eq!(
            e.status(),
            Some(400),
            "the remembered failure keeps its data"
        );
        repeats += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(repeats >= 15, "{repeats} repeats");
    assert_eq!(
        env.count(SIGN),
        1,
        "{repeats} repeats within 4 s, one sign sent"
    );
    // After the hold-down, Vault is asked again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let e = ca.sign(&auth, &csr("httpbin").0, HOUR).await.unwrap_err();
    assert!(!e.is_repeat(), "{e:?}");
    assert_eq!(env.count(SIGN), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_shutdown_revoke_service_tokens_and_skip_batch_ones() {
    let env = VaultEnv::start().await;
    let ca = vault_ca(&env.agent_env());
    let (a, b) = (
        Credential::new(env.jwt("default", "httpbin")),
        Credential::new(env.jwt("default", "sleep")),
    );
    let auth_a = ca.login(&a).await.unwrap();
    let auth_b = ca.login(&b).await.unwrap();

    ca.release(&a).await;
    assert_eq!(revocations(&env), 1);
    assert!(ca.cached_login(&a).await.is_none());
    let err = ca.sign(&auth_a, &csr("httpbin").0, HOUR).await.unwrap_err();
    assert!(
        err.is_token_refused(),
        "the released token is revoked: {err:?}"
    );
    ca.sign(&auth_b, &csr("sleep").0, HOUR)
        .await
        .expect("the other token lives");

    // Batch tokens from now on: nothing to revoke.
    env.bao
        .root(
            Method::POST,
            "auth/kubernetes/role/istio-cert",
            Some(json!({ "token_type": "batch" })),
        )
        .await
        .unwrap();
    let c = Credential::new(env.jwt("default", "httpbin"));
    let auth_c = ca.login(&c).await.unwrap();
    ca.release(&c).await;
    assert_eq!(revocations(&env), 1, "a batch token is not revoked");
    ca.sign(&auth_c, &csr("httpbin").0, HOUR)
        .await
        .expect("and it still works until it expires");
    let d = Credential::new(env.jwt("default", "sleep"));
    let auth_d = ca.login(&d).await.unwrap();

    ca.shutdown().await;
    assert_eq!(revocations(&env), 2, "only b's service token");
    let err = ca.sign(&auth_b, &csr("sleep").0, HOUR).await.unwrap_err();
    assert!(err.is_token_refused(), "{err:?}");
    ca.sign(&auth_d, &csr("sleep").0, HOUR).await.unwrap();
}

/// `revoke-self` requests made with tokens of the kubernetes login (the dev
/// server revokes its own initial root token at start: not counted).
fn revocations(env: &VaultEnv) -> usize {
    env.bao
        .audited_requests()
        .iter()
        .filter(|e| {
            e["request"]["path"] == REVOKE_SELF
                && e["auth"]["display_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("kubernetes-"))
        })
        .count()
}

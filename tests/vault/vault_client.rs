//! The Vault client (`VaultCa`) used directly against a real OpenBao: token
//! lifetimes, invalidation and revocation, sign hold-downs, the roots of the
//! PKI mount, chains without their root, and redirects through real fronts.

use crate::support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use node_agent::ca::vault::VaultCa;
use node_agent::ca::{CaClient, CaError};
use node_agent::config::{CaProvider, Config};
use node_agent::crypto::{split_pem_certs, verify_issued, KeyType, PrivateKey};
use node_agent::identity::{Credential, IdentityError, SpiffeId};
use reqwest::Method;
use serde_json::json;
use support::bao::{rotate_root_issuer, setup_intermediate, PKI_MOUNT};
use support::vault_env::VaultEnv;
use support::vault_front::{FrontOptions, Redirect, TestCa, VaultFront};

/// A Vault client configured from `vars` as the agent would be.
fn vault_ca(vars: &[(&'static str, String)]) -> VaultCa {
    let map: HashMap<&str, String> = vars.iter().cloned().collect();
    let config = Config::from_lookup(|k| map.get(k).cloned(), Some("/unused".into()))
        .expect("valid settings");
    let CaProvider::Vault(v) = config.ca else {
        panic!("not a Vault configuration")
    };
    VaultCa::new(v).expect("Vault client")
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId(format!("spiffe://cluster.local/ns/default/sa/{sa}"))
}

/// A CSR for `sa` and the key to check the answer with.
fn csr(sa: &str) -> (String, PrivateKey) {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    (key.csr_pem(&id(sa)).unwrap(), key)
}

const SIGN: &str = "istio_ca/sign/istio-pki-role";
const LOGIN: &str = "auth/kubernetes/login";
const REVOKE_SELF: &str = "auth/token/revoke-self";
const HOUR: Duration = Duration::from_secs(3600);

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
    let wait = exp - node_agent::identity::unix_now() + 1;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_roots_are_every_root_the_mount_lists_through_a_rotation() {
    let env = VaultEnv::start().await;
    // Checked against OpenBao 2.7: the issuer list and PEMs need no token.
    for path in [format!("{PKI_MOUNT}/issuers?list=true")] {
        let (status, _) = env.bao.call(Method::GET, &path, None, None).await.unwrap();
        assert_eq!(status, 200, "{path} without a token");
    }
    let ca = vault_ca(&env.agent_env());
    let root0 = split_pem_certs(&env.setup.root_pem).unwrap();
    assert_eq!(ca.trust_roots().await.unwrap(), root0);

    // Vault's documented rotation: a new root, made the default issuer.
    let old_id = env
        .bao
        .call(
            Method::GET,
            &format!("{PKI_MOUNT}/issuers?list=true"),
            None,
            None,
        )
        .await
        .unwrap()
        .1["data"]["keys"][0]
        .as_str()
        .unwrap()
        .to_string();
    let (_, root1) = rotate_root_issuer(&env.bao).await.unwrap();
    let root1 = split_pem_certs(&root1).unwrap();
    let both = ca.trust_roots().await.unwrap();
    assert_eq!(both.len(), 2, "both roots while the old one is listed");
    assert!(both.contains(&root0[0]) && both.contains(&root1[0]));
    // New certificates chain to the new root.
    let auth = ca
        .login(&Credential::new(env.jwt("default", "httpbin")))
        .await
        .unwrap();
    let chain = ca.sign(&auth, &csr("httpbin").0, HOUR).await.unwrap();
    assert_eq!(chain.roots_pem, root1);

    // A root the mount lists but that has expired is not trusted.
    env.bao
        .root(
            Method::POST,
            &format!("{PKI_MOUNT}/issuers/import/cert"),
            Some(json!({ "pem_bundle": expired_root() })),
        )
        .await
        .unwrap();
    let listed = ca.trust_roots().await.unwrap();
    assert_eq!(listed.len(), 2, "the expired root is left out");

    // The operator deletes the old issuer: it is no longer a trusted root.
    env.bao
        .root(
            Method::DELETE,
            &format!("{PKI_MOUNT}/issuer/{old_id}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ca.trust_roots().await.unwrap(), root1);
    // No token was used to read them.
    let reads: Vec<_> = env
        .bao
        .audited_requests()
        .into_iter()
        .filter(|e| {
            e["request"]["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(&format!("{PKI_MOUNT}/issuer")))
                && matches!(e["request"]["operation"].as_str(), Some("read" | "list"))
        })
        .collect();
    assert!(!reads.is_empty());
    for r in reads {
        assert!(
            r["auth"]["client_token"].as_str().unwrap_or("").is_empty(),
            "{r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_roots_are_read_in_the_vault_namespace() {
    let env = VaultEnv::start_opts(|o| o.namespace = Some("team".into())).await;
    let ca = vault_ca(&env.agent_env());
    assert_eq!(
        ca.trust_roots().await.unwrap(),
        split_pem_certs(&env.setup.root_pem).unwrap()
    );
    // Without the namespace the mount does not exist.
    let mut vars = env.agent_env();
    vars.retain(|(k, _)| *k != "VAULT_NAMESPACE");
    let err = vault_ca(&vars).trust_roots().await.unwrap_err();
    assert!(
        err.message()
            .contains("cannot read the roots of the PKI mount istio_ca"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_without_its_root_is_completed_from_the_mount_or_refused() {
    let env = VaultEnv::start().await;
    let root = split_pem_certs(&env.setup.root_pem).unwrap();
    setup_intermediate(&env.bao, "int_alone", false, false)
        .await
        .unwrap();
    setup_intermediate(&env.bao, "int_self", true, true)
        .await
        .unwrap();
    setup_intermediate(&env.bao, "int_full", true, false)
        .await
        .unwrap();
    let jwt = Credential::new(env.jwt("default", "httpbin"));
    let sign_with = |mount: &str| {
        let vars = env.agent_env_with(&[(
            "VAULT_SIGN_CSR_PATH",
            &format!("{mount}/sign/istio-pki-role"),
        )]);
        vault_ca(&vars)
    };

    // The mount knows only its intermediate: refused, saying how to fix it.
    let ca = sign_with("int_alone");
    let auth = ca.login(&jwt).await.unwrap();
    assert!(ca.trust_roots().await.unwrap().is_empty());
    let err = ca.sign(&auth, &csr("httpbin").0, HOUR).await.unwrap_err();
    assert!(matches!(err, CaError::BadAnswer(_)), "{err:?}");
    assert!(
        err.message().contains("lists no root that issued it")
            && err.message().contains("int_alone/issuers/import/cert"),
        "{}",
        err.message()
    );

    // The answer carries no root (manual_chain=self) but the mount lists it.
    for mount in ["int_self", "int_full"] {
        let ca = sign_with(mount);
        let auth = ca.login(&jwt).await.unwrap();
        let (csr_pem, key) = csr("httpbin");
        let chain = ca
            .sign(&auth, &csr_pem, HOUR)
            .await
            .unwrap_or_else(|e| panic!("{mount}: {e}"));
        assert_eq!(
            chain.roots_pem, root,
            "{mount}: the root, not the intermediate"
        );
        assert_eq!(chain.chain_pem.len(), 2, "{mount}: leaf and intermediate");
        verify_issued(
            &chain,
            &key.public_key_der(),
            &id("httpbin"),
            SystemTime::now(),
        )
        .unwrap_or_else(|e| panic!("{mount}: {e}"));
        assert_eq!(ca.trust_roots().await.unwrap(), root, "{mount}");
    }
}

/// The agent's settings pointing at `url`, trusting `tls_root` for TLS.
fn via(env: &VaultEnv, url: &str, tls_root: Option<&str>) -> Vec<(&'static str, String)> {
    let mut vars = env.agent_env();
    vars.retain(|(k, _)| !matches!(*k, "VAULT_ADDR" | "CA_ADDR" | "VAULT_TLS_ROOT_CERT"));
    vars.push(("VAULT_ADDR", url.to_string()));
    if let Some(pem) = tls_root {
        vars.push(("VAULT_TLS_ROOT_CERT", pem.to_string()));
    }
    vars
}

/// A plain forwarding front to the real OpenBao.
async fn forwarder(env: &VaultEnv) -> VaultFront {
    VaultFront::start_with(
        env.bao.addr(),
        env.bao.client().clone(),
        FrontOptions::default(),
    )
    .await
}

async fn redirector(env: &VaultEnv, redirect: Redirect, tls: Option<Arc<TestCa>>) -> VaultFront {
    VaultFront::start_with(
        env.bao.addr(),
        env.bao.client().clone(),
        FrontOptions {
            redirect: Some(redirect),
            tls,
            ..FrontOptions::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_redirects_are_followed_twice_at_most_keeping_method_and_body() {
    let env = VaultEnv::start().await;
    let jwt = Credential::new(env.jwt("default", "httpbin"));
    for status in [307, 308] {
        // Two redirects (to itself), then the answer: followed.
        let front = redirector(&env, Redirect::new(status, None, 2), None).await;
        let ca = vault_ca(&via(&env, &front.url, None));
        let auth = ca
            .login(&jwt)
            .await
            .unwrap_or_else(|e| panic!("{status}: {e}"));
        let seen = front.seen();
        assert_eq!(seen.len(), 3, "{status}: the request and two redirects");
        for s in &seen {
            assert_eq!(
                (s.method.as_str(), s.path.as_str()),
                ("POST", "/v1/auth/kubernetes/login")
            );
            let body: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
            assert_eq!(body["jwt"], jwt.expose(), "{status}: the body goes along");
            assert_eq!(body["role"], "istio-cert");
        }
        // The token goes along too.
        let sign_front = redirector(
            &env,
            Redirect {
                only: Some("/sign/".into()),
                ..Redirect::new(status, None, 1)
            },
            None,
        )
        .await;
        let signer = vault_ca(&via(&env, &sign_front.url, None));
        let auth2 = signer.login(&jwt).await.unwrap();
        signer
            .sign(&auth2, &csr("httpbin").0, HOUR)
            .await
            .unwrap_or_else(|e| panic!("{status}: {e}"));
        let signs: Vec<_> = sign_front
            .seen()
            .into_iter()
            .filter(|s| s.path.contains("/sign/"))
            .collect();
        assert_eq!(signs.len(), 2);
        assert!(signs
            .iter()
            .all(|s| s.token.is_some() && s.token == signs[0].token));
        drop(auth);
    }

    // Redirected for ever: the third redirect is not followed.
    let front = redirector(&env, Redirect::new(307, None, usize::MAX), None).await;
    let ca = vault_ca(&via(&env, &front.url, None));
    let err = ca.login(&jwt).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        err.message().contains("more than 2 redirects"),
        "{}",
        err.message()
    );
    assert_eq!(
        front.requests(),
        3,
        "the request and two followed redirects"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_https_to_http_is_never_followed() {
    let env = VaultEnv::start().await;
    let jwt = Credential::new(env.jwt("default", "httpbin"));
    let plain = forwarder(&env).await;
    let test_ca = TestCa::generate();
    let tls_front = redirector(
        &env,
        Redirect::new(307, Some(plain.url.clone()), usize::MAX),
        Some(test_ca.clone()),
    )
    .await;
    assert!(tls_front.url.starts_with("https://"));
    let ca = vault_ca(&via(&env, &tls_front.url, Some(&test_ca.root_pem)));
    let err = ca.login(&jwt).await.unwrap_err();
    assert!(matches!(err, CaError::BadAnswer(_)), "{err:?}");
    assert!(
        err.message()
            .contains("a redirect from https to http would send the JWT"),
        "{}",
        err.message()
    );
    assert_eq!(tls_front.requests(), 1, "the HTTPS front was asked");
    assert_eq!(plain.requests(), 0, "nothing reached the http address");

    // Positive control: the same front redirecting to https is followed.
    let tls_target = redirector(&env, Redirect::new(307, None, 0), Some(test_ca.clone())).await;
    let tls_front = redirector(
        &env,
        Redirect::new(307, Some(tls_target.url.clone()), usize::MAX),
        Some(test_ca.clone()),
    )
    .await;
    let ca = vault_ca(&via(&env, &tls_front.url, Some(&test_ca.root_pem)));
    ca.login(&jwt).await.expect("https to https is followed");
    assert_eq!(tls_target.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_redirects_are_not_followed() {
    let env = VaultEnv::start().await;
    let jwt = Credential::new(env.jwt("default", "httpbin"));
    let target = forwarder(&env).await;
    for status in [301, 302, 303] {
        let front = redirector(
            &env,
            Redirect::new(status, Some(target.url.clone()), usize::MAX),
            None,
        )
        .await;
        let err = vault_ca(&via(&env, &front.url, None))
            .login(&jwt)
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(status), "{err:?}");
        assert!(
            err.message().contains("only 307/308 redirects"),
            "{status}: {}",
            err.message()
        );
    }
    assert_eq!(
        target.requests(),
        0,
        "a POST is never turned into a GET elsewhere"
    );
}

/// A self-signed root that expired yesterday.
fn expired_root() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "expired root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(10);
    p.not_after = now - time::Duration::days(1);
    p.self_signed(&key).unwrap().pem()
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

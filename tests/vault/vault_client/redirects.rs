//! Redirects from Vault (or a front before it): temporary ones are followed
//! twice at most keeping method and body, one from https to http never, and
//! any other not at all.

use crate::support;

use std::sync::Arc;

use node_agent::ca::{CaClient, CaError};
use node_agent::identity::Credential;
use support::vault_env::VaultEnv;
use support::vault_front::{FrontOptions, Redirect, TestCa, VaultFront};

use super::{csr, vault_ca, HOUR};

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
            .contains("a redirect from https to http would send the Vault token"),
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

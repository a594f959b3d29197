//! `vault-setup` follows redirects as the agent does (one client for both):
//! an HTTPS Vault that redirects to `http://` (302 turning the request into
//! a GET, 307/308 keeping its body) or answers any 301/302/303 gets nothing
//! sent where it points, and vault-setup stops naming the refused redirect;
//! a 307 within https (a standby to the active node) is followed with the
//! token, at most twice.
//!
//! No OpenBao is needed: the fronts answer every request with a redirect,
//! and the one that would forward sends to a closed port.

use crate::support;

use std::sync::Arc;

use support::cli::{node_agent, write, Output};
use support::vault_front::{FrontOptions, Redirect, TestCa, VaultFront};

use super::one_error_line;

const TOKEN: &str = "s.admin-token-of-the-redirect-test";

/// A front that redirects every request with `status` to `to` (`None`: to
/// itself), or forwards to a closed port when `redirect` is `None`.
pub(super) async fn front(redirect: Option<Redirect>, tls: Option<Arc<TestCa>>) -> VaultFront {
    let closed = format!("http://127.0.0.1:{}", support::ports::free_port());
    VaultFront::start_with(
        closed,
        reqwest::Client::new(),
        FrontOptions {
            redirect,
            tls,
            ..FrontOptions::default()
        },
    )
    .await
}

/// `vault-setup` against `addr`, trusting `ca` for its TLS.
async fn setup(addr: &str, ca: &TestCa, dir: &std::path::Path) -> Output {
    let ca_file = write(dir, "front-ca.pem", &ca.root_pem);
    setup_with(addr, &[("VAULT_CACERT", ca_file)], dir).await
}

/// `vault-setup` against `addr` with the admin token and `env`.
pub(super) async fn setup_with(
    addr: &str,
    env: &[(&'static str, String)],
    dir: &std::path::Path,
) -> Output {
    let reviewer = write(
        dir,
        "reviewer.jwt",
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
    );
    let mut vars = vec![
        ("VAULT_ADDR", addr.to_string()),
        ("VAULT_TOKEN", TOKEN.to_string()),
    ];
    vars.extend_from_slice(env);
    node_agent(
        &[
            "vault-setup",
            "--kubernetes-host",
            "http://127.0.0.1:1",
            "--token-reviewer-jwt",
            &reviewer,
            "--bound-namespaces",
            "default",
            "--bound-service-accounts",
            "httpbin",
        ],
        &vars,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_from_https_to_http_never_carry_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::generate();
    let mut runs = Vec::new();
    for status in [301, 302, 303, 307, 308] {
        // What listens at the http:// address the redirect names.
        let plain = front(None, None).await;
        let tls_front = front(
            Some(Redirect::new(status, Some(plain.url.clone()), usize::MAX)),
            Some(ca.clone()),
        )
        .await;
        let out = setup(&tls_front.url, &ca, dir.path()).await;
        runs.push((status, plain, tls_front, out));
    }
    let leaks: Vec<_> = runs
        .iter()
        .filter(|(_, plain, _, _)| !plain.seen().is_empty())
        .map(|(status, plain, _, _)| (status, plain.seen()))
        .collect();
    assert!(leaks.is_empty(), "the http:// address received: {leaks:?}");

    for (status, plain, tls_front, out) in &runs {
        assert_eq!(tls_front.requests(), 1, "{status}: {}", out.both());
        assert_eq!(
            tls_front.seen()[0].token.as_deref(),
            Some(TOKEN),
            "{status}: the token went only to VAULT_ADDR"
        );
        assert_eq!(out.code, 1, "{status}: {}", out.both());
        let line = one_error_line(out);
        let to = format!("{}/v1/auth/token/lookup-self", plain.url);
        let expected = if matches!(status, 307 | 308) {
            format!(
                "to {to} ({status}): not followed, because a redirect from https to http would send \
                 the Vault token and the request's body in clear text"
            )
        } else {
            format!("Vault answered a {status} redirect to {to}, which is not followed")
        };
        assert!(
            line.contains(&format!(
                "GET /v1/auth/token/lookup-self at {}",
                tls_front.url
            )) && line.contains(&expected),
            "{status}: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_redirects_within_https_are_followed_twice_at_most() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::generate();

    // A standby's 307 to the active node (another https origin): followed,
    // with the token, as Vault's own client does.
    let active = front(None, Some(ca.clone())).await;
    let standby = front(
        Some(Redirect::new(307, Some(active.url.clone()), usize::MAX)),
        Some(ca.clone()),
    )
    .await;
    let out = setup(&standby.url, &ca, dir.path()).await;
    assert_eq!(out.code, 1, "the active node forwards to a closed port");
    assert_eq!(active.requests(), 1, "{}", out.both());
    assert_eq!(active.seen()[0].token.as_deref(), Some(TOKEN));
    assert!(
        one_error_line(&out).contains("Vault refused GET /v1/auth/token/lookup-self (502"),
        "{}",
        out.both()
    );

    // Redirected for ever: the third redirect is not followed.
    let looping = front(Some(Redirect::new(307, None, usize::MAX)), Some(ca.clone())).await;
    let out = setup(&looping.url, &ca, dir.path()).await;
    assert_eq!(out.code, 1, "{}", out.both());
    assert!(
        one_error_line(&out).contains("more than 2 redirects"),
        "{}",
        out.both()
    );
    assert_eq!(
        looping.requests(),
        3,
        "the request and two followed redirects"
    );
}

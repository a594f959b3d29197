//! `VAULT_CACERT` replaces the system roots for Vault's TLS, as the Vault
//! CLI's does and as the agent's `VAULT_TLS_ROOT_CERT` (one client for
//! both), and `VAULT_TLS_SYSTEM_ROOTS=true` adds them back. The system roots
//! are a test CA through `SSL_CERT_FILE`; the first run shows it is read.
//! The front forwards to a closed port: reaching it (an answer 502) is what
//! trusting its certificate looks like.

use crate::support;

use support::cli::write;
use support::vault_front::TestCa;

use super::one_error_line;
use super::redirects::{front, setup_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_cacert_replaces_the_system_roots_unless_they_are_added_back() {
    let dir = tempfile::tempdir().unwrap();
    let ca_b = TestCa::named("test CA B");
    let vault = front(None, Some(ca_b.clone())).await;
    let system = ("SSL_CERT_FILE", write(dir.path(), "b.pem", &ca_b.root_pem));
    let cacert = (
        "VAULT_CACERT",
        write(dir.path(), "a.pem", &TestCa::named("test CA A").root_pem),
    );
    let reached = "Vault refused GET /v1/auth/token/lookup-self (502";

    let out = setup_with(&vault.url, std::slice::from_ref(&system), dir.path()).await;
    assert!(one_error_line(&out).contains(reached), "{}", out.both());

    let out = setup_with(&vault.url, &[system.clone(), cacert.clone()], dir.path()).await;
    assert_eq!(out.code, 1, "{}", out.both());
    assert!(
        one_error_line(&out).contains(
            "Vault's TLS certificate is not trusted (invalid peer certificate: UnknownIssuer): \
             only the CAs in VAULT_CACERT are trusted, not the system roots: set VAULT_CACERT to \
             the CA that issued Vault's certificate, or VAULT_TLS_SYSTEM_ROOTS=true to trust the \
             system roots too"
        ),
        "{}",
        out.both()
    );
    assert_eq!(vault.requests(), 1, "only the first run reached the front");

    let added = ("VAULT_TLS_SYSTEM_ROOTS", "true".to_string());
    let out = setup_with(&vault.url, &[system, cacert, added], dir.path()).await;
    assert!(one_error_line(&out).contains(reached), "{}", out.both());
}

//! The mistakes an operator makes with `vault-setup`: nothing listening at
//! the address, a TLS certificate VAULT_CACERT does not sign, a token Vault
//! does not know or one without the rights, another engine or auth method
//! already at the paths (stopping before anything is changed). Each gets one
//! clear line and exit 1; unusable input is refused with exit 2 before Vault
//! is asked. And a token with exactly the documented policy is enough.

use crate::support;

use reqwest::Method;
use serde_json::json;

use support::cli::{node_agent, vault_vars, write};

use super::{one_error_line, outcomes, Fixture};

/// The policy docs/vault-setup.md gives for the token that runs vault-setup.
fn readme_admin_policy() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/vault-setup.md"))
        .unwrap();
    let after = doc
        .split("<!-- vault-setup admin policy -->")
        .nth(1)
        .expect("docs/vault-setup.md marks the vault-setup admin policy");
    let block = after
        .split("```hcl\n")
        .nth(1)
        .expect("an hcl block follows the marker");
    block.split("```").next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mistakes_get_a_clear_message_and_exit_1() {
    let f = Fixture::start().await;
    let args = f.k8s_args();
    let mut args_ref: Vec<&str> = vec!["vault-setup"];
    args_ref.extend(args.iter().map(String::as_str));
    let run = |vars: Vec<(&'static str, String)>| {
        let a = args_ref.clone();
        async move { node_agent(&a, &vars).await }
    };
    let with = |k: &'static str, v: &str| {
        let mut vars = vault_vars(&f.bao);
        vars.retain(|(n, _)| *n != k);
        vars.push((k, v.to_string()));
        vars
    };
    let empty = f.state().await;

    // Nothing listens there.
    let port = support::ports::free_port();
    let out = run(with("VAULT_ADDR", &format!("https://127.0.0.1:{port}"))).await;
    assert_eq!(out.code, 1, "{}", out.both());
    let line = one_error_line(&out);
    assert!(
        line.contains(&format!("cannot reach Vault at https://127.0.0.1:{port}"))
            && line.contains("check VAULT_ADDR"),
        "{line}"
    );

    // Vault's TLS certificate is not signed by VAULT_CACERT.
    let other_ca = rcgen::generate_simple_self_signed(vec!["other".to_string()]).unwrap();
    let other = write(f.dir.path(), "other-ca.pem", &other_ca.cert.pem());
    let out = run(with("VAULT_CACERT", &other)).await;
    assert_eq!(out.code, 1, "{}", out.both());
    assert!(
        one_error_line(&out).contains("VAULT_CACERT"),
        "{}",
        out.both()
    );

    // A token Vault does not know.
    let out = run(with("VAULT_TOKEN", "s.not-a-token")).await;
    assert_eq!(out.code, 1, "{}", out.both());
    assert!(
        one_error_line(&out).contains("does not accept the token in VAULT_TOKEN"),
        "{}",
        out.both()
    );
    assert!(
        !out.both().contains("s.not-a-token"),
        "the token is never printed"
    );

    // A valid token without the rights.
    let weak = f
        .bao
        .root(
            Method::POST,
            "auth/token/create",
            Some(json!({ "policies": ["default"] })),
        )
        .await
        .unwrap()["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let out = run(with("VAULT_TOKEN", &weak)).await;
    assert_eq!(out.code, 1, "{}", out.both());
    let line = one_error_line(&out);
    assert!(
        line.contains("may not GET /v1/sys/mounts")
            && line.contains("permission denied")
            && line.contains("docs/vault-setup.md"),
        "{line}"
    );
    assert_eq!(f.state().await, empty, "a refused run changed Vault");

    // Another engine at the PKI path, another method at the auth path: the
    // run stops before changing anything.
    f.bao
        .root(
            Method::POST,
            "sys/mounts/istio_ca",
            Some(json!({ "type": "kv" })),
        )
        .await
        .unwrap();
    let out = run(vault_vars(&f.bao)).await;
    assert_eq!(out.code, 1, "{}", out.both());
    assert!(
        one_error_line(&out).contains(r#"a secrets engine at istio_ca/ already exists with type "kv", not "pki"; choose another path with --pki-path"#),
        "{}",
        out.both()
    );
    let mut other_paths = args_ref.clone();
    other_paths.extend(["--pki-path", "mesh_pki", "--auth-path", "token"]);
    let out = node_agent(&other_paths, &vault_vars(&f.bao)).await;
    assert_eq!(out.code, 1, "{}", out.both());
    assert!(
        one_error_line(&out).contains(
            r#"an auth method at auth/token/ already exists with type "token", not "kubernetes""#
        ),
        "{}",
        out.both()
    );
    let mounts = f.bao.root(Method::GET, "sys/mounts", None).await.unwrap();
    assert!(
        mounts["data"].get("mesh_pki/").is_none(),
        "nothing is created before the check"
    );
    let auths = f.bao.root(Method::GET, "sys/auth", None).await.unwrap();
    assert!(auths["data"].get("kubernetes/").is_none());

    // Unusable input is refused before Vault is asked, with exit 2.
    let out = node_agent(
        &[
            "vault-setup",
            "--bound-namespaces",
            "default",
            "--bound-service-accounts",
            "x",
        ],
        &vault_vars(&f.bao),
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.both());
    assert!(
        one_error_line(&out).contains("--kubernetes-host"),
        "{}",
        out.both()
    );

    // Positive control: a token with exactly the policy docs/vault-setup.md documents
    // can do the whole setup.
    f.bao
        .root(
            Method::POST,
            "sys/policies/acl/vault-setup",
            Some(json!({ "policy": readme_admin_policy() })),
        )
        .await
        .unwrap();
    let admin = f
        .bao
        .root(
            Method::POST,
            "auth/token/create",
            Some(json!({ "policies": ["vault-setup"], "no_default_policy": false })),
        )
        .await
        .unwrap()["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    f.bao
        .root(Method::DELETE, "sys/mounts/istio_ca", None)
        .await
        .unwrap();
    let out = run(with("VAULT_TOKEN", &admin)).await;
    assert_eq!(
        out.code,
        0,
        "docs/vault-setup.md's admin policy is enough:\n{}",
        out.both()
    );
    assert_eq!(outcomes(&out), vec!["created"; 7], "{}", out.both());
}

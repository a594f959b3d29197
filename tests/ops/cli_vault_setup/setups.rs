//! `vault-setup` end to end for each auth method: `kubernetes` (then run again,
//! and with `--dry-run`, changing nothing), `jwt` with a static key, and `jwt`
//! with OIDC discovery. After each, node-agent with the printed settings serves
//! two Envoys doing mTLS, and Vault binds each certificate to its JWT's
//! service account.

use crate::support;

use reqwest::{Method, StatusCode};
use serde_json::json;

use support::cli::{items, settings};
use support::k8s::{TestIssuer, DEFAULT_AUDIENCE};
use support::mesh::SERVER_ID;

use super::{
    agent_serves_a_mesh, csr, outcomes, sign_body, vault_binds_the_identity,
    vault_binds_the_identity_in, Fixture,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_setup_serves_envoys_binds_identities_and_runs_again_unchanged() {
    let f = Fixture::start().await;
    let args = f.k8s_args();

    // Proof 4 on an empty Vault: every request shown, nothing sent.
    let before = f.state().await;
    let writes = f.writes();
    let dry = f.setup(&args, &["--dry-run"]).await;
    assert_eq!(dry.code, 0, "{}", dry.both());
    assert_eq!(outcomes(&dry), vec!["would create"; 7], "{}", dry.both());
    for write in [
        "would POST /v1/sys/mounts/istio_ca",
        "would POST /v1/istio_ca/root/generate/internal",
        "would POST /v1/sys/auth/kubernetes",
        "would POST /v1/auth/kubernetes/config",
        "would POST /v1/istio_ca/roles/istio-pki-role",
        "would POST /v1/sys/policies/acl/istio-cert-policy",
        "would POST /v1/auth/kubernetes/role/istio-cert",
    ] {
        assert!(
            dry.stderr.contains(write),
            "{write} missing:\n{}",
            dry.both()
        );
    }
    let reviewer = std::fs::read_to_string(f.dir.path().join("reviewer.jwt")).unwrap();
    assert!(
        !dry.both().contains(&reviewer),
        "the reviewer JWT is never printed"
    );
    assert!(
        dry.stderr.contains(r#""token_reviewer_jwt":"<redacted>""#),
        "{}",
        dry.both()
    );
    assert_eq!(f.state().await, before, "--dry-run changed Vault");
    assert_eq!(f.writes(), writes, "--dry-run sent a write");

    let first = f.setup(&args, &[]).await;
    assert_eq!(first.code, 0, "{}", first.both());
    assert_eq!(outcomes(&first), vec!["created"; 7], "{}", first.both());
    let vars = settings(&first.stdout);
    let expected = [
        ("CA_PROVIDER", "VaultCA".to_string()),
        ("VAULT_ADDR", f.bao.addr()),
        ("VAULT_AUTH_PATH", "auth/kubernetes/login".into()),
        ("VAULT_ROLE", "istio-cert".into()),
        ("VAULT_SIGN_CSR_PATH", "istio_ca/sign/istio-pki-role".into()),
        ("TRUST_DOMAIN", "cluster.local".into()),
        (
            "VAULT_TLS_ROOT_CERT",
            std::fs::canonicalize(f.bao.ca_pem_path())
                .unwrap()
                .display()
                .to_string(),
        ),
    ];
    for (k, v) in expected {
        assert!(
            vars.contains(&(k.to_string(), v.clone())),
            "{k}={v} missing:\n{}",
            first.stdout
        );
    }
    assert!(!first.both().contains(&reviewer));

    let role = f
        .bao
        .root(Method::GET, "auth/kubernetes/role/istio-cert", None)
        .await
        .unwrap();
    assert_eq!(role["data"]["token_no_default_policy"], true, "{role}");
    let agent = agent_serves_a_mesh(&f, &first).await;
    vault_binds_the_identity(&f, "kubernetes").await;

    // Proof 3: everything unchanged, and no write sent.
    let writes = f.writes();
    let again = f.setup(&args, &[]).await;
    assert_eq!(again.code, 0, "{}", again.both());
    assert_eq!(outcomes(&again), vec!["unchanged"; 7], "{}", again.both());
    assert_eq!(again.stdout, first.stdout);
    assert_eq!(f.writes(), writes, "an unchanged run sent a write");

    // A role that gives tokens the `default` policy again is set back,
    // saying so.
    f.bao
        .root(
            Method::POST,
            "auth/kubernetes/role/istio-cert",
            Some(json!({ "token_no_default_policy": false })),
        )
        .await
        .unwrap();
    let drifted = f.setup(&args, &[]).await;
    assert_eq!(drifted.code, 0, "{}", drifted.both());
    assert_eq!(
        items(&drifted.stderr)
            .into_iter()
            .filter(|(o, _)| o != "unchanged")
            .collect::<Vec<_>>(),
        [(
            "updated".to_string(),
            "auth role auth/kubernetes/role/istio-cert (token_no_default_policy: false -> true)"
                .to_string()
        )],
        "{}",
        drifted.both()
    );

    // A changed flag updates exactly its item, saying what changed...
    let longer = f.setup(&args, &["--token-ttl", "2h"]).await;
    assert_eq!(longer.code, 0, "{}", longer.both());
    let changed: Vec<_> = items(&longer.stderr)
        .into_iter()
        .filter(|(o, _)| o != "unchanged")
        .collect();
    assert_eq!(changed.len(), 1, "{}", longer.both());
    assert_eq!(changed[0].0, "updated");
    assert!(
        changed[0]
            .1
            .starts_with("auth role auth/kubernetes/role/istio-cert")
            && changed[0].1.contains("token_ttl: 1h -> 2h"),
        "{changed:?}"
    );
    let role = f
        .bao
        .root(Method::GET, "auth/kubernetes/role/istio-cert", None)
        .await
        .unwrap();
    assert_eq!(role["data"]["token_ttl"], 7200);

    // A PKI role with Vault's default key usage (as written before
    // vault-setup set it): the run names the difference and fixes it.
    let pki_role = "istio_ca/roles/istio-pki-role";
    let mut written = f.bao.root(Method::GET, pki_role, None).await.unwrap()["data"].take();
    written["key_usage"] = json!(["DigitalSignature", "KeyAgreement", "KeyEncipherment"]);
    f.bao
        .root(Method::POST, pki_role, Some(written))
        .await
        .unwrap();
    let fixed = f.setup(&args, &["--token-ttl", "2h"]).await;
    assert_eq!(fixed.code, 0, "{}", fixed.both());
    let changed: Vec<_> = items(&fixed.stderr)
        .into_iter()
        .filter(|(o, _)| o != "unchanged")
        .collect();
    assert_eq!(changed.len(), 1, "{}", fixed.both());
    assert_eq!(
        changed[0],
        (
            "updated".to_string(),
            "PKI role istio_ca/roles/istio-pki-role (key_usage: \
             [DigitalSignature, KeyAgreement, KeyEncipherment] -> [DigitalSignature])"
                .to_string()
        ),
        "{}",
        fixed.both()
    );
    let role = f.bao.root(Method::GET, pki_role, None).await.unwrap();
    assert_eq!(role["data"]["key_usage"], json!(["DigitalSignature"]));

    // ...and proof 4 on a configured Vault: --dry-run shows the update, sends nothing.
    let before = f.state().await;
    let writes = f.writes();
    let dry = f.setup(&args, &["--token-ttl", "3h", "--dry-run"]).await;
    assert_eq!(dry.code, 0, "{}", dry.both());
    assert!(
        dry.stderr.contains(
            "would update  auth role auth/kubernetes/role/istio-cert (token_ttl: 2h -> 3h"
        ),
        "{}",
        dry.both()
    );
    assert_eq!(f.state().await, before, "--dry-run changed Vault");
    assert_eq!(f.writes(), writes, "--dry-run sent a write");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_setup_serves_envoys_and_binds_identities() {
    let f = Fixture::start().await;
    // Service tokens, which the agent revokes when it stops.
    let mut args = f.jwt_args();
    args.extend(["--token-type".to_string(), "service".to_string()]);
    let first = f.setup(&args, &[]).await;
    assert_eq!(first.code, 0, "{}", first.both());
    assert_eq!(outcomes(&first), vec!["created"; 7], "{}", first.both());
    assert!(
        settings(&first.stdout).contains(&("VAULT_AUTH_PATH".into(), "auth/jwt/login".into())),
        "{}",
        first.stdout
    );
    let mut agent = agent_serves_a_mesh(&f, &first).await;
    vault_binds_the_identity(&f, "jwt").await;
    // The policy lets the tokens revoke themselves, without `default`.
    assert!(agent.terminate().success(), "{}", agent.log());
    assert!(
        agent.log().contains("revoked the agent's Vault tokens"),
        "{}",
        agent.log()
    );

    // Outside the bound service accounts, the login itself is refused.
    let (status, body) = f
        .bao
        .call(
            Method::POST,
            "auth/jwt/login",
            None,
            Some(&json!({ "role": "istio-cert", "jwt": f.jwt("intruder") })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let again = f.setup(&args, &[]).await;
    assert_eq!(outcomes(&again), vec!["unchanged"; 7], "{}", again.both());
}

/// A service-account issuer's OIDC discovery document and JWKS, as the
/// kube-apiserver serves them at `--service-account-issuer`.
async fn serve_oidc_discovery(issuer: &TestIssuer) -> (String, tokio::task::JoinHandle<()>) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let key = rsa::RsaPublicKey::from_public_key_pem(&issuer.public_key_pem()).unwrap();
    let jwks = json!({ "keys": [{
        "kty": "RSA", "alg": "RS256", "use": "sig", "kid": issuer.kid(),
        "n": B64.encode(key.n().to_bytes_be()), "e": B64.encode(key.e().to_bytes_be()),
    }]});
    let discovery = json!({
        "issuer": base,
        "jwks_uri": format!("{base}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    });
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let (jwks, discovery) = (jwks.clone(), discovery.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/.well-known/openid-configuration" => ("200 OK", discovery.to_string()),
                    "/openid/v1/jwks" => ("200 OK", jwks.to_string()),
                    _ => ("404 Not Found", "{}".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    (base, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_with_oidc_discovery_binds_identities() {
    let mut f = Fixture::start().await;
    let (base, _server) = serve_oidc_discovery(&f.issuer).await;
    f.issuer.issuer = base.clone();
    let args: Vec<String> = [
        "--auth-method",
        "jwt",
        "--oidc-discovery-url",
        &base,
        "--audience",
        DEFAULT_AUDIENCE,
        "--bound-namespaces",
        "default",
        "--bound-service-accounts",
        "httpbin,sleep",
        "--trust-domain",
        "example.org",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = f.setup(&args, &[]).await;
    assert_eq!(out.code, 0, "{}", out.both());
    assert!(
        settings(&out.stdout).contains(&("TRUST_DOMAIN".into(), "example.org".into())),
        "{}",
        out.stdout
    );
    vault_binds_the_identity_in(&f, "jwt", "example.org").await;
    // The trust domain is part of the binding: cluster.local is refused.
    let token = f.login("jwt", &f.jwt("httpbin")).await;
    let (status, body) = f.sign(&token, sign_body(csr(SERVER_ID))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let again = f.setup(&args, &[]).await;
    assert_eq!(outcomes(&again), vec!["unchanged"; 7], "{}", again.both());
}

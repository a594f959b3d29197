//! `node-agent vault-setup` against a real OpenBao (TLS), from an empty
//! server: node-agent with the printed settings serves two real Envoys doing
//! mTLS; a workload holding one service account's JWT, talking to Vault
//! directly, cannot have a certificate for another signed; a second run
//! changes nothing; `--dry-run` changes nothing; the `jwt` method does the
//! same; and the failures an operator hits get a clear message and exit 1.
//!
//! [`setups`] runs each auth method end to end, [`mistakes`] the operator's
//! errors, [`ca_bundle`] an intermediate CA given with `--ca-bundle`,
//! [`redirects`] the redirects it follows and refuses, [`tls_roots`] the
//! CAs it trusts for Vault's TLS; this file
//! holds the OpenBao they share and the checks every run makes.

use crate::support;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use node_agent::crypto::{KeyType, PrivateKey};
use node_agent::identity::SpiffeId;
use support::agent::Agent;
use support::bao::Bao;
use support::cli::{items, node_agent, settings, vault_vars, write, Output};
use support::envoy::{HDR_CLIENT_SAW_SERVER_URI, HDR_SERVER_SAW_CLIENT_URI};
use support::k8s::{start_token_review, TestIssuer, TokenReviewHandle, DEFAULT_AUDIENCE};
use support::mesh::{Mesh, CLIENT_ID, SERVER_ID};
use support::vault_env::issuer;

mod ca_bundle;
mod mistakes;
mod redirects;
mod setups;
mod tls_roots;

/// An empty OpenBao, a TokenReview stand-in, and the files vault-setup reads.
struct Fixture {
    bao: Bao,
    issuer: TestIssuer,
    _review: TokenReviewHandle,
    review_url: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        let issuer = issuer();
        let review = start_token_review(&issuer.public_key_pem(), 0)
            .await
            .expect("token review server");
        let bao = Bao::start_tls().await.expect("start OpenBao");
        Fixture {
            review_url: review.url(),
            bao,
            issuer,
            _review: review,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The kubernetes method's flags: the stand-in as kube-apiserver (any
    /// PEM serves as its CA: it speaks plain http), Vault's reviewer JWT.
    fn k8s_args(&self) -> Vec<String> {
        let reviewer = self
            .issuer
            .mint("kube-system", "vault-auth", Duration::from_secs(86400));
        vec![
            "--kubernetes-host".into(),
            self.review_url.clone(),
            "--kubernetes-ca-cert".into(),
            self.bao.ca_pem_path().display().to_string(),
            "--token-reviewer-jwt".into(),
            write(self.dir.path(), "reviewer.jwt", &reviewer),
            "--bound-namespaces".into(),
            "default".into(),
            "--bound-service-accounts".into(),
            "httpbin,sleep".into(),
        ]
    }

    fn jwt_args(&self) -> Vec<String> {
        vec![
            "--auth-method".into(),
            "jwt".into(),
            "--jwt-validation-pubkeys".into(),
            write(
                self.dir.path(),
                "sa-signer.pub",
                &self.issuer.public_key_pem(),
            ),
            "--audience".into(),
            DEFAULT_AUDIENCE.into(),
            "--bound-namespaces".into(),
            "default".into(),
            "--bound-service-accounts".into(),
            "httpbin,sleep".into(),
        ]
    }

    async fn setup(&self, base: &[String], extra: &[&str]) -> Output {
        let mut args = vec!["vault-setup"];
        args.extend(base.iter().map(String::as_str));
        args.extend_from_slice(extra);
        node_agent(&args, &vault_vars(&self.bao)).await
    }

    fn jwt(&self, sa: &str) -> String {
        self.issuer.mint("default", sa, Duration::from_secs(3600))
    }

    /// Logs in at `auth/<method>/login` as the workload holding `jwt`.
    async fn login(&self, method: &str, jwt: &str) -> String {
        let (status, body) = self
            .bao
            .call(
                Method::POST,
                &format!("auth/{method}/login"),
                None,
                Some(&json!({ "role": "istio-cert", "jwt": jwt })),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "login: {body}");
        body["auth"]["client_token"].as_str().unwrap().to_string()
    }

    async fn sign(&self, token: &str, body: Value) -> (StatusCode, Value) {
        self.bao
            .call(
                Method::POST,
                "istio_ca/sign/istio-pki-role",
                Some(token),
                Some(&body),
            )
            .await
            .unwrap()
    }

    /// Everything vault-setup touches, read back, to see that nothing changed.
    async fn state(&self) -> Value {
        let mut s = json!({});
        for path in [
            "sys/mounts",
            "sys/auth",
            "istio_ca/roles/istio-pki-role",
            "sys/policies/acl/istio-cert-policy",
            "auth/kubernetes/config",
            "auth/kubernetes/role/istio-cert",
            "auth/jwt/config",
            "auth/jwt/role/istio-cert",
        ] {
            let (status, body) = self
                .bao
                .call(Method::GET, path, Some("root"), None)
                .await
                .unwrap();
            s[path] = json!({ "status": status.as_u16(), "data": body["data"] });
        }
        let list = Method::from_bytes(b"LIST").unwrap();
        for path in ["istio_ca/issuers", "sys/policies/acl"] {
            let (_, body) = self
                .bao
                .call(list.clone(), path, Some("root"), None)
                .await
                .unwrap();
            s[path] = body["data"].clone();
        }
        s
    }

    /// Audited requests that could change something (create, update, delete).
    fn writes(&self) -> usize {
        let log = std::fs::read_to_string(self.bao.audit_log_path()).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["type"] == "request")
            .filter(|e| {
                matches!(
                    e["request"]["operation"].as_str(),
                    Some("create" | "update" | "delete")
                )
            })
            .count()
    }
}

fn csr(id: &str) -> String {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    key.csr_pem(&SpiffeId(id.into())).unwrap()
}

/// A CSR carrying `id` as URI SAN plus a DNS name.
fn csr_with_dns(id: &str, dns: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![dns.to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names
        .push(rcgen::SanType::URI(id.to_string().try_into().unwrap()));
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn sign_body(csr: String) -> Value {
    json!({ "csr": csr, "format": "pem", "ttl": "1h", "exclude_cn_from_sans": true })
}

fn uris_of(pem: &str) -> Vec<String> {
    support::sds_client::leaf_facts(pem).0
}

/// Proof 1: node-agent with exactly the printed settings serves two real
/// Envoys that do mTLS with the identities Vault signed, its Vault tokens
/// carrying only the policy vault-setup wrote.
async fn agent_serves_a_mesh(f: &Fixture, out: &Output) -> Agent {
    let vars = settings(&out.stdout);
    let env: Vec<(&str, String)> = vars.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let agent = Agent::start(&env);
    let mesh = Mesh::start(
        &agent.socket,
        &f.jwt("httpbin"),
        &f.jwt("sleep"),
        "hello through vault-setup",
        || agent.log(),
    )
    .await;
    let resp = mesh.get().await;
    assert_eq!(resp.status(), 200, "agent log:\n{}", agent.log());
    assert_eq!(resp.headers()[HDR_SERVER_SAW_CLIENT_URI], CLIENT_ID);
    assert_eq!(resp.headers()[HDR_CLIENT_SAW_SERVER_URI], SERVER_ID);
    assert_eq!(resp.text().await.unwrap(), "hello through vault-setup");
    for p in agent_token_policies(f) {
        assert_eq!(p, json!(["istio-cert-policy"]), "no `default` policy");
    }
    agent
}

/// Proof 2: the workload holding httpbin's JWT, logging in itself, gets its
/// own identity signed and nothing else: not sleep's, no extra DNS name, no
/// common name, and its token may do nothing but sign.
async fn vault_binds_the_identity(f: &Fixture, method: &str) {
    vault_binds_the_identity_in(f, method, "cluster.local").await
}

async fn vault_binds_the_identity_in(f: &Fixture, method: &str, trust_domain: &str) {
    let id = |sa: &str| format!("spiffe://{trust_domain}/ns/default/sa/{sa}");
    let (server_id, client_id) = (id("httpbin"), id("sleep"));
    let (server_id, client_id) = (server_id.as_str(), client_id.as_str());
    let token = f.login(method, &f.jwt("httpbin")).await;
    let (status, own) = f.sign(&token, sign_body(csr(server_id))).await;
    assert_eq!(status, StatusCode::OK, "own identity: {own}");
    assert_eq!(
        uris_of(own["data"]["certificate"].as_str().unwrap()),
        [server_id]
    );
    // An X509-SVID: basicConstraints with cA=false, which SPIFFE clients of
    // the Workload API require of a leaf.
    let pem =
        x509_parser::pem::parse_x509_pem(own["data"]["certificate"].as_str().unwrap().as_bytes())
            .unwrap()
            .1;
    let (_, leaf) = x509_parser::parse_x509_certificate(&pem.contents).unwrap();
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("the leaf carries basicConstraints (basic_constraints_valid_for_non_ca)");
    assert!(!bc.value.ca, "a leaf, not a CA");

    let (status, other) = f.sign(&token, sign_body(csr(client_id))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{other}");
    assert!(
        other["errors"][0].as_str().unwrap().contains(
            "URI Subject Alternative Names were provided via CSR which are not valid for this role"
        ),
        "{other}"
    );
    let (status, dns) = f
        .sign(
            &token,
            sign_body(csr_with_dns(SERVER_ID, "evil.example.com")),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{dns}");
    let mut with_cn = sign_body(csr(server_id));
    with_cn["common_name"] = json!("evil.example.com");
    let (status, cn) = f.sign(&token, with_cn).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{cn}");

    // Least privilege: the login's token has the one policy, without Vault's
    // `default`...
    let lookup = f
        .bao
        .root(
            Method::POST,
            "auth/token/lookup",
            Some(json!({ "token": token })),
        )
        .await
        .unwrap();
    assert_eq!(
        lookup["data"]["policies"],
        json!(["istio-cert-policy"]),
        "{lookup}"
    );
    // ...so it may not issue (Vault-made keys), read the role, look itself
    // up (which `default` grants), or touch anything else.
    for (method, path) in [
        (Method::POST, "istio_ca/issue/istio-pki-role"),
        (Method::GET, "istio_ca/roles/istio-pki-role"),
        (Method::GET, "auth/token/lookup-self"),
        (Method::GET, "sys/mounts"),
    ] {
        let (status, body) = f
            .bao
            .call(
                method.clone(),
                path,
                Some(&token),
                Some(&json!({"common_name": "x"})),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
    }
}

/// The policies of the tokens the agent logged in for and signed with,
/// from the audit log: each login's answer, and each sign request's token.
fn agent_token_policies(f: &Fixture) -> Vec<Value> {
    let log = std::fs::read_to_string(f.bao.audit_log_path()).unwrap_or_default();
    let entries: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let logins = entries.iter().filter(|e| {
        e["type"] == "response"
            && e["request"]["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("/login"))
    });
    let signs = entries.iter().filter(|e| {
        e["type"] == "request" && e["request"]["path"] == "istio_ca/sign/istio-pki-role"
    });
    let policies: Vec<Value> = logins
        .map(|e| e["response"]["auth"]["policies"].clone())
        .chain(signs.map(|e| e["auth"]["policies"].clone()))
        .collect();
    assert!(
        policies.len() >= 2,
        "the agent logged in and signed: {policies:?}"
    );
    policies
}

fn outcomes(out: &Output) -> Vec<String> {
    items(&out.stderr).into_iter().map(|(o, _)| o).collect()
}

fn one_error_line(out: &Output) -> &str {
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{}", out.both());
    assert!(
        lines[0].starts_with("node-agent vault-setup: error: "),
        "{}",
        out.both()
    );
    lines[0]
}

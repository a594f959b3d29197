//! `node-agent vault-setup` against a real OpenBao (TLS), from an empty
//! server: node-agent with the printed settings serves two real Envoys doing
//! mTLS; a workload holding one service account's JWT, talking to Vault
//! directly, cannot have a certificate for another signed; a second run
//! changes nothing; `--dry-run` changes nothing; the `jwt` method does the
//! same; and the failures an operator hits get a clear message and exit 1.

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
/// Envoys that do mTLS with the identities Vault signed.
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

    // Least privilege: the login's token may not issue (Vault-made keys),
    // read the role, or touch anything else.
    for (method, path) in [
        (Method::POST, "istio_ca/issue/istio-pki-role"),
        (Method::GET, "istio_ca/roles/istio-pki-role"),
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

fn outcomes(out: &Output) -> Vec<String> {
    items(&out.stderr).into_iter().map(|(o, _)| o).collect()
}

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

    let agent = agent_serves_a_mesh(&f, &first).await;
    vault_binds_the_identity(&f, "kubernetes").await;

    // Proof 3: everything unchanged, and no write sent.
    let writes = f.writes();
    let again = f.setup(&args, &[]).await;
    assert_eq!(again.code, 0, "{}", again.both());
    assert_eq!(outcomes(&again), vec!["unchanged"; 7], "{}", again.both());
    assert_eq!(again.stdout, first.stdout);
    assert_eq!(f.writes(), writes, "an unchanged run sent a write");

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
    let args = f.jwt_args();
    let first = f.setup(&args, &[]).await;
    assert_eq!(first.code, 0, "{}", first.both());
    assert_eq!(outcomes(&first), vec!["created"; 7], "{}", first.both());
    assert!(
        settings(&first.stdout).contains(&("VAULT_AUTH_PATH".into(), "auth/jwt/login".into())),
        "{}",
        first.stdout
    );
    let _agent = agent_serves_a_mesh(&f, &first).await;
    vault_binds_the_identity(&f, "jwt").await;

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

/// A root and an intermediate signed by it, as an organisation's offline CA
/// would hand over: (bundle PEM: key, intermediate, root; root PEM).
fn intermediate_bundle(name: &str) -> (String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params(&format!("{name} root"));
    let root = root_params.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate().unwrap();
    let int = ca_params(&format!("{name} intermediate"))
        .signed_by(&int_key, &Issuer::new(root_params, root_key))
        .unwrap();
    (
        format!("{}{}{}", int_key.serialize_pem(), int.pem(), root.pem()),
        root.pem(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_bundle_makes_an_intermediate_the_issuer_and_a_new_one_replaces_it() {
    let f = Fixture::start().await;
    let (bundle, root) = intermediate_bundle("org");
    let bundle_path = write(f.dir.path(), "ca-bundle.pem", &bundle);
    let args = f.k8s_args();
    let dry = f
        .setup(&args, &["--ca-bundle", &bundle_path, "--dry-run"])
        .await;
    assert_eq!(dry.code, 0, "{}", dry.both());
    assert!(
        !dry.both().contains("PRIVATE KEY"),
        "the CA key is never printed:\n{}",
        dry.both()
    );
    assert!(
        dry.stderr
            .contains("<redacted: private key and 2 certificate(s)"),
        "{}",
        dry.both()
    );

    let out = f.setup(&args, &["--ca-bundle", &bundle_path]).await;
    assert_eq!(out.code, 0, "{}", out.both());
    assert!(
        out.stderr.contains("created       CA of istio_ca/ from"),
        "{}",
        out.both()
    );

    // The agent's certificate chains leaf -> intermediate -> root, and the
    // root is what ROOTCA serves: shown by `node-agent fetch`.
    let vars = settings(&out.stdout);
    let env: Vec<(&str, String)> = vars.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let agent = Agent::start(&env);
    let token = write(f.dir.path(), "httpbin.jwt", &f.jwt("httpbin"));
    let socket = agent.socket.display().to_string();
    let shown = node_agent(
        &[
            "fetch",
            "--workload-uds-path",
            &socket,
            "--token",
            &token,
            "-o",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(shown.code, 0, "{}\nagent:\n{}", shown.both(), agent.log());
    let v: Value = serde_json::from_str(&shown.stdout).unwrap();
    let chain = &v["resources"][0]["certificates"];
    let subjects: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["issuer"].as_str().unwrap())
        .collect();
    // Leaf by the intermediate, the intermediate by the root (which the
    // chain may or may not repeat).
    assert_eq!(
        subjects[..2],
        ["CN=org intermediate", "CN=org root"],
        "{}",
        shown.stdout
    );
    assert!(
        subjects[2..].iter().all(|s| *s == "CN=org root"),
        "{}",
        shown.stdout
    );
    assert_eq!(v["resources"][0]["check"]["ok"], true, "{}", shown.stdout);
    assert_eq!(
        v["resources"][1]["roots"][0]["pem"]
            .as_str()
            .unwrap()
            .trim(),
        root.trim()
    );

    let again = f.setup(&args, &["--ca-bundle", &bundle_path]).await;
    assert_eq!(outcomes(&again), vec!["unchanged"; 7], "{}", again.both());

    // A new intermediate (a CA rotation) becomes the default issuer; the old
    // one stays so that what it signed still verifies.
    let (next, _) = intermediate_bundle("next");
    let next_path = write(f.dir.path(), "next-bundle.pem", &next);
    let rotated = f.setup(&args, &["--ca-bundle", &next_path]).await;
    assert_eq!(rotated.code, 0, "{}", rotated.both());
    assert!(
        rotated
            .stderr
            .contains("updated       CA of istio_ca/ from")
            && rotated.stderr.contains("the earlier issuers stay"),
        "{}",
        rotated.both()
    );
    let list = Method::from_bytes(b"LIST").unwrap();
    let (_, issuers) = f
        .bao
        .call(list, "istio_ca/issuers", Some("root"), None)
        .await
        .unwrap();
    assert_eq!(
        issuers["data"]["keys"].as_array().unwrap().len(),
        4,
        "{issuers}"
    );

    // A bundle without its root is refused before Vault is asked.
    let no_root: String = next
        .split_inclusive("-----END CERTIFICATE-----\n")
        .take(1)
        .collect();
    let no_root_path = write(f.dir.path(), "no-root.pem", &no_root);
    let bad = f.setup(&args, &["--ca-bundle", &no_root_path]).await;
    assert_eq!(bad.code, 2, "{}", bad.both());
    assert!(
        one_error_line(&bad).contains("add the root certificate at the end"),
        "{}",
        bad.both()
    );
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

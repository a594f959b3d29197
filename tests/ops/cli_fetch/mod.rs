//! `node-agent fetch` against a running agent, with the local CA and with a
//! real OpenBao: every output shows what the agent serves an Envoy (checked
//! against the same secrets fetched over the SDS API), every failure is one
//! line with a non-zero exit ([`failures`]), and `--watch` shows a rotation
//! and, against OpenBao, a root change ([`watch`]).

use crate::support;

use serde_json::Value;

use node_agent::crypto::{split_pem_certs, PrivateKey};
use support::agent::Agent;
use support::cli::{node_agent, write, Output};
use support::sds_client::{
    connect, fake_jwt, fetch, leaf_facts, secrets, tls_certificate, trusted_ca,
};
use support::vault_env::VaultEnv;

mod failures;
mod watch;

const ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

/// What the agent serves `jwt`, straight from the SDS API: (chain PEM, roots PEM).
async fn served(socket: &std::path::Path, jwt: &str) -> (String, String) {
    let mut client = connect(socket).await;
    let resp = fetch(&mut client, &["default", "ROOTCA"], jwt)
        .await
        .expect("FetchSecrets");
    let s = secrets(&resp);
    (tls_certificate(&s[0]).0, trusted_ca(&s[1]))
}

fn pem_blocks(text: &str) -> Vec<(String, Vec<u8>)> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .map(|b| {
            let b = b.expect("valid PEM");
            (b.label, b.contents)
        })
        .collect()
}

async fn run_fetch(socket: &str, token: &str, extra: &[&str]) -> Output {
    let mut args = vec!["fetch", "--workload-uds-path", socket, "--token", token];
    args.extend_from_slice(extra);
    node_agent(&args, &[]).await
}

/// Checks text, PEM and JSON output for the workload holding `jwt` against
/// what the SDS API serves it.
async fn every_output_shows_what_envoy_gets(agent: &Agent, jwt: &str, dir: &std::path::Path) {
    let socket = agent.socket.display().to_string();
    let token = write(dir, "token.jwt", jwt);
    let (chain_pem, roots_pem) = served(&agent.socket, jwt).await;
    let chain = split_pem_certs(&chain_pem).unwrap();
    let roots = split_pem_certs(&roots_pem).unwrap();
    let (uris, serial) = leaf_facts(&chain_pem);
    assert_eq!(uris, [ID]);
    let leaf_der = pem_blocks(&chain[0]).remove(0).1;
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let root_subject = {
        let der = pem_blocks(&roots[0]).remove(0).1;
        let (_, r) = x509_parser::parse_x509_certificate(&der).unwrap();
        r.subject().to_string()
    };

    // Text: each certificate's facts, the chain with issuers, the roots.
    let text = run_fetch(&socket, &token, &[]).await;
    assert_eq!(text.code, 0, "{}\nagent:\n{}", text.both(), agent.log());
    let out = &text.stdout;
    for want in [
        format!("default: certificate chain of {}", chain.len()),
        format!("URI SANs:   {ID}"),
        format!("serial:     {serial}"),
        "key type:   ec-p256".to_string(),
        format!("issuer:     {}", leaf.issuer()),
        "subject:    (empty)".to_string(),
        format!("{ID}  issued by  {}", leaf.issuer()),
        format!("ROOTCA: {} trusted root(s)", roots.len()),
        format!("subject:    {root_subject}"),
        // ALL: this mesh's trust domain alone (nothing is federated).
        "ALL: 1 trust domain(s), for Envoy's SPIFFE validator".to_string(),
        format!("  cluster.local (this mesh): {} root(s)", roots.len()),
        "check: the key matches the certificate, which is valid now and chains to a root served in ROOTCA".to_string(),
    ] {
        assert!(out.contains(&want), "{want:?} missing:\n{out}");
    }
    assert!(out.contains(" left)"), "time left:\n{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");

    // PEM: the chain then the roots, exactly as served (ALL's, the same,
    // not again); the key only when asked.
    let pem = run_fetch(&socket, &token, &["-o", "pem"]).await;
    assert_eq!(pem.code, 0, "{}", pem.both());
    let mut expected = chain.clone();
    expected.extend(roots.iter().cloned());
    assert_eq!(split_pem_certs(&pem.stdout).unwrap(), expected);
    assert!(!pem.stdout.contains("PRIVATE KEY"));
    let with_key = run_fetch(&socket, &token, &["-o", "pem", "--include-key"]).await;
    let keys: Vec<_> = pem_blocks(&with_key.stdout)
        .into_iter()
        .filter(|(l, _)| l == "PRIVATE KEY")
        .collect();
    assert_eq!(keys.len(), 1, "{}", with_key.both());
    let key_pem = with_key
        .stdout
        .split_inclusive("-----END PRIVATE KEY-----\n")
        .find(|p| p.contains("BEGIN PRIVATE KEY"))
        .map(|p| &p[p.find("-----BEGIN PRIVATE KEY").unwrap()..])
        .unwrap();
    let key = PrivateKey::from_pem(key_pem).unwrap();
    assert_eq!(
        key.public_key_der(),
        leaf.public_key().raw,
        "the key written is the certificate's"
    );
    let roots_only = run_fetch(&socket, &token, &["--resource", "ROOTCA", "-o", "pem"]).await;
    assert_eq!(split_pem_certs(&roots_only.stdout).unwrap(), roots);

    // JSON: all of the above.
    let json = run_fetch(&socket, &token, &["-o", "json"]).await;
    assert_eq!(json.code, 0, "{}", json.both());
    let v: Value = serde_json::from_str(&json.stdout).expect("one JSON document");
    let def = &v["resources"][0];
    assert_eq!(def["name"], "default");
    let c0 = &def["certificates"][0];
    assert_eq!(c0["uri_sans"], serde_json::json!([ID]));
    assert_eq!(c0["serial"], serial.as_str());
    assert_eq!(c0["key_type"], "ec-p256");
    assert_eq!(c0["issuer"], leaf.issuer().to_string());
    assert!(c0["seconds_left"].as_i64().unwrap() > 0);
    assert!(c0["not_after"].as_str().unwrap().ends_with('Z'));
    assert_eq!(def["certificates"].as_array().unwrap().len(), chain.len());
    assert_eq!(def["private_key"]["key_type"], "ec-p256");
    assert!(
        def["private_key"].get("pem").is_none(),
        "no key without --include-key"
    );
    assert_eq!(def["check"]["ok"], true);
    assert_eq!(v["resources"][1]["name"], "ROOTCA");
    assert_eq!(v["resources"][1]["roots"][0]["subject"], root_subject);
    let all = &v["resources"][2];
    assert_eq!(all["name"], "ALL");
    assert_eq!(all["trust_domains"][0]["name"], "cluster.local");
    assert_eq!(all["trust_domains"][0]["roots"][0]["subject"], root_subject);
    assert_eq!(all["trust_domains"].as_array().unwrap().len(), 1);
    let json_key = run_fetch(&socket, &token, &["-o", "json", "--include-key"]).await;
    let v: Value = serde_json::from_str(&json_key.stdout).unwrap();
    assert!(v["resources"][0]["private_key"]["pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_against_the_local_ca() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[("CA_PROVIDER", "LocalCA".into())]);
    every_output_shows_what_envoy_gets(&agent, &fake_jwt("default", "httpbin"), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_and_the_cas_refusal_against_openbao() {
    let dir = tempfile::tempdir().unwrap();
    let env = VaultEnv::start().await;
    let agent = Agent::start(&env.agent_env());
    every_output_shows_what_envoy_gets(&agent, &env.jwt("default", "httpbin"), dir.path()).await;

    // A service account the Vault role refuses: the CA's own words, one line.
    let token = write(dir.path(), "intruder.jwt", &env.jwt("default", "intruder"));
    let socket = agent.socket.display().to_string();
    let out = run_fetch(&socket, &token, &[]).await;
    assert_eq!(out.code, 1, "{}", out.both());
    let line = one_line_error(&out);
    assert!(
        line.starts_with("node-agent fetch: error: permission denied: ")
            && line.contains("service account name not authorized"),
        "{line}"
    );
    assert!(out.stdout.is_empty());
}

fn one_line_error(out: &Output) -> &str {
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "one line expected:\n{}",
        out.both()
    );
    out.stderr.trim_end()
}

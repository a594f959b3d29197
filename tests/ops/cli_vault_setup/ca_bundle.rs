//! `vault-setup --ca-bundle`: an intermediate CA given as a bundle becomes the
//! PKI mount's issuer, certificates chain through it, and a new bundle
//! replaces it.

use crate::support;

use reqwest::Method;
use serde_json::Value;

use support::agent::Agent;
use support::cli::{node_agent, settings, write};

use super::{one_error_line, outcomes, Fixture};

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

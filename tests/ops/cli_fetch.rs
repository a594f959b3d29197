//! `node-agent fetch` against a running agent, with the local CA and with a
//! real OpenBao: every output shows what the agent serves an Envoy (checked
//! against the same secrets fetched over the SDS API), every failure is one
//! line with a non-zero exit, and `--watch` shows a rotation and, against
//! OpenBao, a root change.

use crate::support;

use std::time::Duration;

use serde_json::Value;

use node_agent::crypto::{split_pem_certs, PrivateKey};
use support::agent::Agent;
use support::cli::{node_agent, write, Output, Watch};
use support::sds_client::{
    connect, fake_jwt, fetch, leaf_facts, secrets, tls_certificate, trusted_ca,
};
use support::vault_env::VaultEnv;

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
        "check: the key matches the certificate, which is valid now and chains to a root served in ROOTCA".to_string(),
    ] {
        assert!(out.contains(&want), "{want:?} missing:\n{out}");
    }
    assert!(out.contains(" left)"), "time left:\n{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");

    // PEM: the chain then the roots, exactly as served; the key only when asked.
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

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// `node-agent fetch ARGS` as an unprivileged user (root ignores file modes).
async fn fetch_unprivileged(args: &[&str]) -> Output {
    if !running_as_root() {
        return node_agent(args, &[]).await;
    }
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_node-agent"))
        .args(args)
        .env_clear()
        .output()
        .await
        .expect("setpriv (util-linux) runs node-agent as nobody");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_one_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = Agent::start(&[("CA_PROVIDER", "LocalCA".into())]);
    let socket = agent.socket.display().to_string();
    let good = write(d, "good.jwt", &fake_jwt("default", "httpbin"));
    // Positive control: with a token and the socket (here from
    // WORKLOAD_UDS_PATH, as the agent reads it) it works.
    let ok = node_agent(
        &["fetch", "--token", &good, "-o", "pem"],
        &[("WORKLOAD_UDS_PATH", socket.clone())],
    )
    .await;
    assert_eq!(ok.code, 0, "{}", ok.both());
    assert!(
        ok.stdout.starts_with("-----BEGIN CERTIFICATE-----"),
        "{}",
        ok.both()
    );

    let cases: Vec<(&str, Output, &str)> = vec![
        (
            "no socket",
            run_fetch(&d.join("absent.sock").display().to_string(), &good, &[]).await,
            "no agent socket at",
        ),
        (
            "a dead agent's socket",
            {
                let path = d.join("stale.sock");
                drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
                run_fetch(&path.display().to_string(), &good, &[]).await
            },
            "nothing is listening on",
        ),
        (
            "no token",
            node_agent(&["fetch", "--workload-uds-path", &socket], &[]).await,
            "unauthenticated: no credential",
        ),
        (
            "not a JWT",
            run_fetch(&socket, &write(d, "bad.jwt", "not-a-jwt"), &[]).await,
            "unauthenticated: invalid credential",
        ),
        (
            "permission denied on the socket",
            {
                // A socket in a 0700 directory of another user.
                use std::os::unix::fs::PermissionsExt;
                let locked = d.join("locked");
                std::fs::create_dir(&locked).unwrap();
                let path = locked.join("sock");
                let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
                std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
                fetch_unprivileged(&["fetch", "--workload-uds-path", &path.display().to_string()])
                    .await
            },
            "permission denied connecting to",
        ),
        (
            "not an SDS server",
            {
                let path = d.join("http.sock");
                let l = tokio::net::UnixListener::bind(&path).unwrap();
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while let Ok((mut c, _)) = l.accept().await {
                        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                    }
                });
                run_fetch(&path.display().to_string(), &good, &[]).await
            },
            "does not answer as an SDS server",
        ),
        (
            "a server that never answers",
            {
                let path = d.join("silent.sock");
                let l = tokio::net::UnixListener::bind(&path).unwrap();
                tokio::spawn(async move {
                    let mut held = Vec::new();
                    while let Ok((c, _)) = l.accept().await {
                        held.push(c);
                    }
                });
                run_fetch(&path.display().to_string(), &good, &["--timeout", "1s"]).await
            },
            "no answer from the agent at",
        ),
    ];
    for (what, out, expected) in &cases {
        assert_eq!(out.code, 1, "{what}: {}", out.both());
        let line = one_line_error(out);
        assert!(
            line.starts_with("node-agent fetch: error: ") && line.contains(expected),
            "{what}: expected {expected:?} in {line:?}"
        );
        assert!(out.stdout.is_empty(), "{what}: {}", out.both());
    }
    assert!(
        cases[2].1.stderr.contains("--token FILE"),
        "the unauthenticated message says what to do: {}",
        cases[2].1.stderr
    );

    // Unusable arguments: exit 2.
    for args in [
        vec![
            "fetch",
            "--workload-uds-path",
            &socket,
            "--token",
            "/nonexistent/token",
        ],
        vec![
            "fetch",
            "--workload-uds-path",
            &socket,
            "--token",
            &good,
            "--include-key",
        ],
        vec![
            "fetch",
            "--workload-uds-path",
            &socket,
            "--resource",
            "other",
        ],
    ] {
        let out = node_agent(&args, &[]).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.both());
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_each_rotation() {
    let dir = tempfile::tempdir().unwrap();
    // A 4 s certificate, renewed at half its life (counted from its
    // arrival), without jitter: a rotation every 2 s.
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "4s".into()),
        ("SECRET_GRACE_PERIOD_RATIO", "0.5".into()),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0".into()),
    ]);
    let token = write(dir.path(), "token.jwt", &fake_jwt("default", "httpbin"));
    let socket = agent.socket.display().to_string();
    let mut watch = Watch::start(
        &[
            "fetch",
            "--workload-uds-path",
            &socket,
            "--token",
            &token,
            "--watch",
        ],
        &[],
    );
    watch
        .until(Duration::from_secs(20), |l| l.starts_with("--- push 1 at "))
        .await;
    let first_serial = watch
        .until(Duration::from_secs(5), |l| {
            l.trim_start().starts_with("serial:")
        })
        .await
        .trim_start()
        .trim_start_matches("serial:")
        .trim()
        .to_string();
    let push2 = watch
        .until(Duration::from_secs(20), |l| l.starts_with("--- push 2 at "))
        .await;
    assert!(
        push2.contains(&format!("default: rotated, serial {first_serial} -> ")),
        "{push2}\nagent:\n{}",
        agent.log()
    );
    let second_serial = watch
        .until(Duration::from_secs(5), |l| {
            l.trim_start().starts_with("serial:")
        })
        .await;
    assert!(!second_serial.contains(&first_serial), "{second_serial}");
    assert_eq!(watch.interrupt().await, 0, "Ctrl-C ends --watch cleanly");

    // JSON lines: one document per push, each a new certificate.
    let mut watch = Watch::start(
        &[
            "fetch",
            "--workload-uds-path",
            &socket,
            "--token",
            &token,
            "--watch",
            "-o",
            "json",
        ],
        &[],
    );
    let mut serials = Vec::new();
    for _ in 0..2 {
        let line = watch
            .until(Duration::from_secs(20), |l| l.starts_with('{'))
            .await;
        let v: Value = serde_json::from_str(&line).expect("one JSON document per line");
        serials.push(
            v["resources"][0]["certificates"][0]["serial"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_ne!(serials[0], serials[1], "the second push is a rotation");
    watch.interrupt().await;
}

/// `--watch` against OpenBao shows a root change: the PKI mount's root
/// rotated (`root/rotate/internal`, then made the default issuer), the
/// agent's next trust refresh pushes ROOTCA with the new root, and the push
/// line says so, listing the new root; and a rotation of the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_a_root_change_against_openbao() {
    let dir = tempfile::tempdir().unwrap();
    let env = VaultEnv::start().await;
    // A certificate renewed every 4 s; the mount's roots read every second.
    let agent = Agent::start(&env.agent_env_with(&[
        ("SECRET_TTL", "8s"),
        ("SECRET_GRACE_PERIOD_RATIO", "0.5"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
        ("TRUST_REFRESH_INTERVAL", "1s"),
    ]));
    let token = write(dir.path(), "token.jwt", &env.jwt("default", "httpbin"));
    let socket = agent.socket.display().to_string();
    let mut watch = Watch::start(
        &[
            "fetch",
            "--workload-uds-path",
            &socket,
            "--token",
            &token,
            "--watch",
        ],
        &[],
    );
    watch
        .until(Duration::from_secs(20), |l| l.starts_with("--- push 1 at "))
        .await;
    watch
        .until(Duration::from_secs(5), |l| {
            l.starts_with("ROOTCA: 1 trusted root(s)")
        })
        .await;
    // A rotation on the old root.
    let rotated = watch
        .until(Duration::from_secs(20), |l| {
            l.contains("default: rotated, serial ")
        })
        .await;
    assert!(rotated.starts_with("--- push "), "{rotated}");
    assert!(
        !watch.seen.iter().any(|l| l.contains("root(s) added")),
        "no root change before the rotation of the root:\n{}",
        watch.seen.join("\n")
    );

    let new_root = support::bao::rotate_root(&env.bao).await.unwrap();
    let (_, new_serial) = leaf_facts(&new_root);
    let changed = watch
        .until(Duration::from_secs(20), |l| {
            l.contains("ROOTCA: 1 root(s) added, 0 removed")
        })
        .await;
    assert!(
        changed.starts_with("--- push "),
        "{changed}\nagent:\n{}",
        agent.log()
    );
    watch
        .until(Duration::from_secs(5), |l| {
            l.starts_with("ROOTCA: 2 trusted root(s)")
        })
        .await;
    watch
        .until(Duration::from_secs(5), |l| {
            l.trim_start() == format!("serial:     {new_serial}")
        })
        .await;
    assert_eq!(watch.interrupt().await, 0, "Ctrl-C ends --watch cleanly");
}

//! `node-agent fetch --watch`: the stream stays open and every push is
//! printed, saying what changed: a rotation of the workload's certificate
//! with the local CA, and a root change against OpenBao.

use crate::support;

use std::time::Duration;

use serde_json::Value;

use support::agent::Agent;
use support::cli::{write, Watch};
use support::sds_client::{fake_jwt, leaf_facts};
use support::vault_env::VaultEnv;

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

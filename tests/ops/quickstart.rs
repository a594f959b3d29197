//! `./quickstart.sh`, the README's first steps, run as a user runs it: real
//! OpenBao, three Envoys, the TokenReview stand-in, on free loopback ports.
//! It must end with PASS: sleep reaches httpbin over mTLS with certificates
//! OpenBao signed through node-agent, the intruder is refused, and
//! `node-agent fetch` shows both. The test suite's debug builds stand in
//! for the release build the script would otherwise make.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `dev_k8s` example next to the test binaries, built if needed (an
/// integration test run alone does not build examples).
fn dev_k8s() -> PathBuf {
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--locked", "--example", "dev_k8s"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // Without the variables cargo sets for this test (CARGO_PKG_NAME...):
    // build scripts that watch them (ring's) would run again, and every
    // crate above them be rebuilt, here and in the next `cargo test`.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
            || ["CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR", "OUT_DIR"].contains(&&*k)
        {
            cargo.env_remove(&*k);
        }
    }
    let status = cargo.status().expect("cargo build --example dev_k8s");
    assert!(status.success(), "cargo build --example dev_k8s: {status}");
    let bin = Path::new(env!("CARGO_BIN_EXE_node-agent"))
        .parent()
        .unwrap()
        .join("examples")
        .join("dev_k8s");
    assert!(bin.exists(), "no {}", bin.display());
    bin
}

#[test]
fn quickstart_ends_with_pass() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("bash")
        .arg(repo.join("quickstart.sh"))
        .env("NODE_AGENT_BIN", env!("CARGO_BIN_EXE_node-agent"))
        .env("DEV_K8S_BIN", dev_k8s())
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("bash quickstart.sh");
    // It takes a few seconds; SIGTERM makes it stop what it started.
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            panic!(
                "quickstart.sh did not finish within 180 s:\n{}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(log.path()).unwrap();
    assert!(status.success(), "quickstart.sh: {status}\n{out}");
    for want in [
        "2/8 Using the given node-agent and dev_k8s helper",
        "Envoy httpbin: LIVE",
        "Envoy sleep: LIVE",
        "x-server-saw-client: spiffe://cluster.local/ns/default/sa/sleep",
        "URI SANs:   spiffe://cluster.local/ns/default/sa/sleep",
        "check: the key matches the certificate",
        "service account name not authorized",
        "PASS  sleep -> httpbin over mTLS with certificates from OpenBao via node-agent;",
        "the intruder service account was refused by OpenBao (403) and got no certificate;",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
}

//! Both third-party clients against the agent: the `spiffe` crate gets a
//! verified SVID, the same one SDS serves, then a rotation on the same stream,
//! and is told the JWT-SVID methods are not served; py-spiffe (run as a Python
//! script) does the same and sees the errors.

use crate::support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use spiffe::WorkloadApiClient;
use support::agent::Agent;
use support::sds_client::{self, fake_jwt};
use tokio_stream::StreamExt;

use super::{api_agent, endpoint, verify, SPIFFE_ID};

#[tokio::test]
async fn spiffe_crate_gets_a_verified_svid_then_a_rotation_on_the_same_stream() {
    let a = api_agent(
        true,
        &[
            ("SECRET_TTL", "6s".into()),
            ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0".into()),
        ],
    );
    let client = WorkloadApiClient::connect_to(endpoint(&a.api_socket))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let serial = verify(&svid, &bundles);

    // One cache: SDS serves this workload the very same certificate.
    let mut sds = sds_client::connect(&a.agent.socket).await;
    let resp = sds_client::fetch(&mut sds, &["default"], &fake_jwt("default", "httpbin"))
        .await
        .unwrap();
    let (chain, _) = sds_client::tls_certificate(&sds_client::secrets(&resp)[0]);
    assert_eq!(sds_client::leaf_facts(&chain).1, serial);

    // The stream pushes the renewed SVID (6 s lifetime, renewed at 3 s).
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let mut serials = vec![];
    while serials.len() < 2 {
        let ctx = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no rotation within 15 s; saw {serials:?}\n{}",
                    a.agent.log()
                )
            })
            .expect("the stream stays open")
            .unwrap();
        let svid = ctx.default_svid().unwrap();
        let s = verify(svid, ctx.bundle_set());
        if !serials.contains(&s) {
            serials.push(s);
        }
    }
    assert!(a.agent.log().contains("Workload API: FetchX509SVID sent"));

    // The JWT-SVID profile is refused with a reason.
    for err in [
        client
            .fetch_jwt_svid(&["audience"], None)
            .await
            .map(|_| ())
            .unwrap_err(),
        client.fetch_jwt_bundles().await.map(|_| ()).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            msg.contains("Unimplemented")
                || msg.contains("UNIMPLEMENTED")
                || msg.contains("unimplemented"),
            "{msg}"
        );
        assert!(msg.contains("X.509 certificates only"), "{msg}");
    }
    let body = String::from_utf8_lossy(svid.private_key().as_bytes()).to_string();
    assert!(!a.agent.log().contains(&body), "key in the log");
}

/// Runs tests/pyspiffe/check.py with the `python3` on PATH (test.sh puts the
/// peers' virtualenv, which has py-spiffe, first) and returns its JSON line.
fn py_spiffe(args: &[&str], agent: &Agent) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyspiffe/check.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spiffe check {args:?} failed ({}):\n{stdout}\n{}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_gets_a_verified_svid_sees_a_rotation_and_the_errors() {
    let a = api_agent(
        true,
        &[
            ("SECRET_TTL", "6s".into()),
            ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0".into()),
        ],
    );
    let node = api_agent(false, &[]);
    let socket = a.api_socket.display().to_string();
    let node_socket = node.api_socket.display().to_string();
    let agent_log = &a.agent;

    let (svid, no_header, denied) = tokio::task::block_in_place(|| {
        (
            py_spiffe(&["svid", &socket, SPIFFE_ID, "2", "20"], agent_log),
            py_spiffe(&["no-header", &socket], agent_log),
            py_spiffe(&["denied", &node_socket], &node.agent),
        )
    });
    // py-spiffe verified the SVID against the bundle and saw two serials.
    let serials = svid["serials"].as_array().unwrap();
    assert_eq!(serials.len(), 2, "{svid}");
    assert!(svid["bundle_authorities"].as_u64().unwrap() >= 1, "{svid}");
    assert!(svid["fetch_jwt_svid"]
        .as_str()
        .unwrap()
        .contains("UNIMPLEMENTED"));
    // The first serial is the agent's certificate (the agent logs it
    // with colons; py-spiffe prints hex without leading zeros).
    let log = a.agent.log();
    let first = svid["first_serial"].as_str().unwrap();
    assert!(
        log.lines()
            .filter(|l| l.contains("Workload API: FetchX509SVID sent"))
            .any(|l| l.replace(':', "").to_lowercase().contains(first)),
        "{first} not in\n{log}"
    );

    assert_eq!(no_header["code"], "INVALID_ARGUMENT", "{no_header}");
    assert_eq!(no_header["details"], "security header missing from request");
    let denied = denied["error"].as_str().unwrap();
    assert!(denied.contains("PERMISSION_DENIED"), "{denied}");
    assert!(
        denied.contains("node-wide attestation is not supported"),
        "{denied}"
    );
}

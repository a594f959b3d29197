//! The logs: with `LOG_FORMAT=json` every line is one JSON object with a
//! timestamp, a level, a message and the fields beside them; and bad status
//! and log settings stop the agent with a message naming them.

use crate::support;

use std::time::Duration;

use serde_json::Value;
use support::agent::Agent;
use support::sds_client::*;

use super::{local_agent, SPIFFE_A};

/// `LOG_FORMAT=json`: every line of a run is one JSON object with a
/// timestamp, a level and a message, and the fields beside them.
#[tokio::test]
async fn json_logs_one_object_per_line() {
    let mut agent = local_agent(&[("LOG_FORMAT", "json")]);
    let jwt = fake_jwt("default", "httpbin");
    let mut client = connect(&agent.socket).await;
    fetch(&mut client, &["default"], &jwt)
        .await
        .expect("served");
    let refused = fetch(&mut client, &["default"], "not-a-jwt")
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    // SIGTERM while the client's connection is open: waited for off the
    // runtime that drives that connection, so that it can close.
    let (st, agent) = tokio::task::spawn_blocking(move || (agent.terminate(), agent))
        .await
        .unwrap();
    assert!(st.success(), "{}", agent.log());
    drop(client);

    let log = agent.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert!(v.is_object(), "{l}");
            let ts = v["timestamp"]
                .as_str()
                .unwrap_or_else(|| panic!("no timestamp: {l}"));
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("timestamp {ts:?} is not RFC 3339 ({e}): {l}"));
            let level = v["level"]
                .as_str()
                .unwrap_or_else(|| panic!("no level: {l}"));
            assert!(
                ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
                "{l}"
            );
            assert!(
                v["message"].as_str().is_some_and(|m| !m.is_empty()),
                "no message: {l}"
            );
            assert!(!l.contains(&jwt), "a JWT reached the log: {l}");
            v
        })
        .collect();
    let find = |what: &str| {
        lines
            .iter()
            .find(|v| v["message"].as_str().unwrap().starts_with(what))
            .unwrap_or_else(|| panic!("no line {what:?} in\n{log}"))
    };
    assert!(lines.len() >= 5, "{log}");
    find("SDS gRPC server start");
    assert_eq!(find("issued workload certificate")["identity"], SPIFFE_A);
    assert_eq!(find("refusing FetchSecrets")["level"], "WARN");
    assert!(find("status server listening")["addr"].is_string());
    assert_eq!(
        lines.last().unwrap()["message"],
        "SDS server stopped",
        "{log}"
    );

    // The default stays the human format.
    let mut text = local_agent(&[]);
    assert!(text.terminate().success());
    let first = text.log().lines().next().unwrap().to_string();
    assert!(serde_json::from_str::<Value>(&first).is_err(), "{first}");
}

/// Bad or unusable settings of this module stop the agent with a message
/// naming them.
#[tokio::test]
async fn bad_status_and_log_settings_stop_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sock");
    let cases = [
        (
            "LOG_FORMAT",
            "yaml".to_string(),
            2,
            "invalid setting LOG_FORMAT=\"yaml\"",
        ),
        (
            "STATUS_ADDR",
            "15020".to_string(),
            2,
            "invalid setting STATUS_ADDR=\"15020\"",
        ),
    ];
    for (var, value, code, message) in cases {
        let mut a = Agent::spawn(
            &socket,
            dir.path(),
            &[("CA_PROVIDER", "LocalCA".into()), (var, value)],
        );
        let st = a.wait_exit(Duration::from_secs(15));
        assert_eq!(st.code(), Some(code), "{}", a.log());
        assert!(a.log().contains(message), "{}", a.log());
    }
    // The flag wins over the variable and is checked the same way.
    let mut a = Agent::spawn_args(
        &socket,
        dir.path(),
        &[("CA_PROVIDER", "LocalCA".into())],
        &["--status-addr", "nowhere"],
    );
    assert_eq!(a.wait_exit(Duration::from_secs(15)).code(), Some(2));
    assert!(
        a.log()
            .contains("invalid setting --status-addr=\"nowhere\""),
        "{}",
        a.log()
    );

    // The port is taken: the agent says which setting to change.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut a = Agent::spawn(
        &socket,
        dir.path(),
        &[
            ("CA_PROVIDER", "LocalCA".into()),
            ("STATUS_ADDR", addr.clone()),
        ],
    );
    assert_eq!(a.wait_exit(Duration::from_secs(15)).code(), Some(1));
    assert!(
        a.log()
            .contains(&format!("cannot listen on STATUS_ADDR {addr}")),
        "{}",
        a.log()
    );
    assert!(!socket.exists(), "no SDS socket left behind");

    // Empty turns it off: the agent serves SDS without it.
    let a = local_agent(&[("STATUS_ADDR", "")]);
    assert!(a.log().contains("status server off"), "{}", a.log());
}

//! Real Envoys validate their peers with `ALL` instead of `ROOTCA`: each
//! takes `ALL` (Envoy's SPIFFE certificate validator, configured with this
//! mesh's trust domain and its roots) in a `combined_validation_context`
//! beside its static URI-SAN match, over `StreamSecrets` on one side and
//! `DeltaSecrets` on the other. Envoy accepts the resource (no NACK, the
//! validator in its config dump), mTLS works, and a peer of another SPIFFE
//! ID is still refused.

use crate::support;

use std::time::Duration;

use serde_json::Value;
use support::agent::Agent;
use support::envoy::*;
use support::sds_client::fake_jwt;

const READY: Duration = Duration::from_secs(60);
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

/// The bootstrap with every SDS validation context named `ALL`, not `ROOTCA`.
fn with_all(mut config: Value) -> Value {
    fn walk(v: &mut Value, replaced: &mut usize) {
        match v {
            Value::Object(map) => {
                if let Some(sds) = map.get_mut("validation_context_sds_secret_config") {
                    assert_eq!(sds["name"], SECRET_ROOTCA);
                    sds["name"] = "ALL".into();
                    *replaced += 1;
                }
                map.values_mut().for_each(|v| walk(v, replaced));
            }
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, replaced)),
            _ => {}
        }
    }
    let mut replaced = 0;
    walk(&mut config, &mut replaced);
    assert_eq!(replaced, 1, "one validation context in the bootstrap");
    config
}

async fn get(port: u16) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("request through the client Envoy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_validate_peers_with_the_spiffe_validator_of_all() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&[("CA_PROVIDER", "LocalCA".into())]);
    let token = |name: &str, sa: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, fake_jwt("default", sa)).unwrap();
        p
    };
    let sds = |sa: &str| SdsSource::GoogleGrpc {
        uds_path: agent.socket.clone(),
        token_file: token(sa, sa),
    };
    let (server_port, client_port, intruder_port) = (free_port(), free_port(), free_port());
    let (backend, _backend) = start_backend("hello from the backend").await;
    let server = EnvoyProc::start(&with_all(server_config(
        &sds("httpbin"),
        server_port,
        backend,
        CLIENT_ID,
    )))
    .await
    .unwrap();
    let client = EnvoyProc::start(&with_all(client_config(
        &SdsSource::Delta(Box::new(sds("sleep"))),
        client_port,
        server_port,
        SERVER_ID,
    )))
    .await
    .unwrap();
    let intruder = EnvoyProc::start(&with_all(client_config(
        &sds("intruder"),
        intruder_port,
        server_port,
        SERVER_ID,
    )))
    .await
    .unwrap();
    for envoy in [&server, &client, &intruder] {
        envoy
            .wait_ready(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}\nagent:\n{}", agent.log()));
    }

    let resp = get(client_port).await;
    assert_eq!(
        resp.status(),
        200,
        "server log:\n{}\nagent:\n{}",
        server.log_tail(),
        agent.log()
    );
    assert_eq!(
        resp.headers()[HDR_SERVER_SAW_CLIENT_URI].to_str().unwrap(),
        CLIENT_ID
    );
    assert_eq!(
        resp.headers()[HDR_CLIENT_SAW_SERVER_URI].to_str().unwrap(),
        SERVER_ID
    );
    assert_eq!(resp.text().await.unwrap(), "hello from the backend");
    // The static URI-SAN match still applies beside the SPIFFE validator.
    assert_eq!(get(intruder_port).await.status(), 503);

    // Envoy holds ALL as sent: the SPIFFE validator with this mesh's domain.
    for envoy in [&server, &client] {
        let (status, dump) = envoy
            .admin_get("/config_dump?resource=dynamic_active_secrets")
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(
            dump.contains("\"name\": \"ALL\"")
                && dump.contains("envoy.tls.cert_validator.spiffe")
                && dump.contains("\"name\": \"cluster.local\""),
            "{dump}"
        );
    }
    let log = agent.log();
    assert!(!log.contains("NACK"), "{log}");
    assert!(
        log.contains("SDS delta: push") && log.contains("resources=ALL"),
        "both protocols served ALL:\n{log}"
    );
}

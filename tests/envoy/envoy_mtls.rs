//! Real Envoys take their certificates from node-agent over SDS and do mTLS
//! with them: a client Envoy originates mTLS to a server Envoy that requires a
//! client certificate, checks it against ROOTCA and matches the peer's SPIFFE
//! ID; a plain HTTP request through both reaches a backend.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::envoy::*;
use support::sds_client::fake_jwt;

const READY: Duration = Duration::from_secs(60);
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";

async fn get(port: u16) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/headers"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("request through the client Envoy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_do_mtls_on_certificates_from_one_agent_over_google_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&[("CA_PROVIDER", "LocalCA".into())]);
    let token = |name: &str, ns: &str, sa: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, fake_jwt(ns, sa)).unwrap();
        p
    };
    let server_token = token("server-token", "default", "httpbin");
    let client_token = token("client-token", "default", "sleep");
    let intruder_token = token("intruder-token", "default", "intruder");

    let (server_port, client_port, intruder_port) = (free_port(), free_port(), free_port());
    let (backend, _backend) = start_backend("hello from the backend").await;
    let sds = |t: &std::path::Path| SdsSource::GoogleGrpc {
        uds_path: agent.socket.clone(),
        token_file: t.to_path_buf(),
    };
    let server = start_server_envoy(sds(&server_token), server_port, backend, CLIENT_ID)
        .await
        .unwrap();
    let client = start_client_envoy(sds(&client_token), client_port, server_port, SERVER_ID)
        .await
        .unwrap();
    let intruder = start_client_envoy(sds(&intruder_token), intruder_port, server_port, SERVER_ID)
        .await
        .unwrap();
    server.wait_ready(READY).await.unwrap();
    client.wait_ready(READY).await.unwrap();
    intruder.wait_ready(READY).await.unwrap();

    // The request goes client Envoy → mTLS → server Envoy → backend.
    let resp = get(client_port).await;
    assert_eq!(resp.status(), 200, "agent log:\n{}", agent.log());
    let saw_client = resp
        .headers()
        .get(HDR_SERVER_SAW_CLIENT_URI)
        .map(|v| v.to_str().unwrap().to_string());
    let saw_server = resp
        .headers()
        .get(HDR_CLIENT_SAW_SERVER_URI)
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(resp.text().await.unwrap(), "hello from the backend");
    assert_eq!(
        saw_client.as_deref(),
        Some(CLIENT_ID),
        "server Envoy verified the client's SPIFFE ID"
    );
    assert_eq!(
        saw_server.as_deref(),
        Some(SERVER_ID),
        "client Envoy verified the server's SPIFFE ID"
    );

    // Admin /certs shows the SPIFFE URI SANs of the SDS-served certificates.
    let server_uris = cert_uris(&server.certs().await);
    assert!(
        server_uris.contains(&SERVER_ID.to_string()),
        "{server_uris:?}"
    );
    let client_uris = cert_uris(&client.certs().await);
    assert!(
        client_uris.contains(&CLIENT_ID.to_string()),
        "{client_uris:?}"
    );

    // A workload with another identity has a valid certificate from the same
    // CA, but the server Envoy's SPIFFE ID match refuses it.
    let resp = get(intruder_port).await;
    assert_eq!(
        resp.status(),
        503,
        "the server must refuse a peer with another SPIFFE ID"
    );
    let intruder_uris = cert_uris(&intruder.certs().await);
    assert!(intruder_uris.contains(&"spiffe://cluster.local/ns/default/sa/intruder".to_string()));

    // Envoy's header reached the agent (google_grpc file_based_metadata).
    let log = agent.log();
    assert!(log.contains("SDS: push"), "{log}");
    assert!(
        !log.contains(&fake_jwt("default", "sleep")),
        "the JWT must not be logged"
    );

    // SIGTERM with Envoys connected: the agent ends the streams and exits, removing the socket.
    let st = agent.terminate();
    assert!(st.success(), "{st:?}\n{}", agent.log());
    assert!(!agent.socket.exists());
    // Established connections keep working without the agent.
    assert_eq!(get(client_port).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_pod_agents_with_token_files_over_envoy_grpc() {
    // One agent per pod, each reading its pod's token file; both sign with
    // one local CA root persisted in LOCAL_CA_DIR.
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    // The two pods also use the other key types Envoy must accept.
    let pod = |name: &str, sa: &str, key_type: &str| {
        let token = dir.path().join(format!("{name}-token"));
        std::fs::write(&token, fake_jwt("default", sa)).unwrap();
        Agent::start(&[
            ("CA_PROVIDER", "LocalCA".into()),
            ("LOCAL_CA_DIR", ca_dir.display().to_string()),
            ("WORKLOAD_TOKEN_PATH", token.display().to_string()),
            ("KEY_TYPE", key_type.into()),
        ])
    };
    let server_agent = pod("server", "httpbin", "rsa-2048");
    let client_agent = pod("client", "sleep", "ec-p384");

    let (server_port, client_port) = (free_port(), free_port());
    let (backend, _backend) = start_backend("per-pod backend").await;
    let server = start_server_envoy(
        SdsSource::EnvoyGrpc {
            uds_path: server_agent.socket.clone(),
        },
        server_port,
        backend,
        CLIENT_ID,
    )
    .await
    .unwrap();
    let client = start_client_envoy(
        SdsSource::EnvoyGrpc {
            uds_path: client_agent.socket.clone(),
        },
        client_port,
        server_port,
        SERVER_ID,
    )
    .await
    .unwrap();
    server.wait_ready(READY).await.unwrap();
    client.wait_ready(READY).await.unwrap();

    let resp = get(client_port).await;
    assert_eq!(
        resp.status(),
        200,
        "server agent:\n{}\nclient agent:\n{}",
        server_agent.log(),
        client_agent.log()
    );
    assert_eq!(
        resp.headers()
            .get(HDR_SERVER_SAW_CLIENT_URI)
            .unwrap()
            .to_str()
            .unwrap(),
        CLIENT_ID
    );
    assert_eq!(resp.text().await.unwrap(), "per-pod backend");
    assert!(cert_uris(&server.certs().await).contains(&SERVER_ID.to_string()));
}

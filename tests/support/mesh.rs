//! Two workloads' Envoys on one agent, doing mTLS: a server Envoy (identity
//! `default/httpbin`) in front of a backend, and a client Envoy (identity
//! `default/sleep`) that originates mTLS to it.

use std::path::Path;
use std::time::Duration;

use super::envoy::*;

pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const READY: Duration = Duration::from_secs(60);

pub struct Mesh {
    pub server: EnvoyProc,
    pub client: EnvoyProc,
    /// Plain HTTP into the client Envoy.
    pub client_port: u16,
    pub server_port: u16,
    _dir: tempfile::TempDir,
    _backend: tokio::task::JoinHandle<()>,
}

impl Mesh {
    /// Starts both Envoys with `google_grpc` SDS sources on `socket`, each
    /// with its own token file, and waits until both have their secrets.
    /// `agent_log` is shown when they do not.
    pub async fn start(
        socket: &Path,
        server_jwt: &str,
        client_jwt: &str,
        body: &'static str,
        agent_log: impl Fn() -> String,
    ) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let sds = |name: &str, jwt: &str| {
            let token = dir.path().join(name);
            std::fs::write(&token, jwt).unwrap();
            SdsSource::GoogleGrpc {
                uds_path: socket.to_path_buf(),
                token_file: token,
            }
        };
        let server_sds = sds("server-token", server_jwt);
        let client_sds = sds("client-token", client_jwt);
        let mut mesh = Self::start_with(server_sds, client_sds, body, agent_log).await;
        mesh._dir = dir;
        mesh
    }

    /// Starts both Envoys on the given SDS sources and waits until both have
    /// their secrets.
    pub async fn start_with(
        server_sds: SdsSource,
        client_sds: SdsSource,
        body: &'static str,
        agent_log: impl Fn() -> String,
    ) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let (server_port, client_port) = (free_port(), free_port());
        let (backend, _backend) = start_backend(body).await;
        let server = start_server_envoy(server_sds, server_port, backend, CLIENT_ID)
            .await
            .unwrap();
        let client = start_client_envoy(client_sds, client_port, server_port, SERVER_ID)
            .await
            .unwrap();
        for envoy in [&server, &client] {
            envoy
                .wait_ready(READY)
                .await
                .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent_log()));
        }
        Mesh {
            server,
            client,
            client_port,
            server_port,
            _dir: dir,
            _backend,
        }
    }

    /// GET through the client Envoy.
    pub async fn get(&self) -> reqwest::Response {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/", self.client_port))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("request through the client Envoy")
    }
}

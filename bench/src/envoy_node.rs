//! What Envoy really sends: a real Envoy (the peers' 1.40) is started once
//! against a capture server on a Unix socket, with the same `google_grpc` SDS
//! source as a sidecar, and its first `StreamSecrets` request is kept. Its
//! `node` (with the build's list of extensions, tens of KiB) then goes into
//! every request the load generator sends, as Envoy puts it into each of its
//! requests.

use std::path::Path;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Context};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use futures::Stream;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use crate::support::envoy::{server_config, EnvoyProc, SdsSource};
use crate::support::ports::free_port;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Keeps the first `StreamSecrets` request; answers nothing.
struct Capture {
    first: Mutex<Option<oneshot::Sender<DiscoveryRequest>>>,
}

#[tonic::async_trait]
impl SecretDiscoveryService for Capture {
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut inbound = request.into_inner();
        if let Ok(Some(first)) = inbound.message().await {
            if let Some(tx) = self.first.lock().expect("capture lock").take() {
                let _ = tx.send(first);
            }
        }
        Ok(Response::new(Box::pin(futures::stream::pending())))
    }

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("capture"))
    }

    async fn fetch_secrets(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("capture"))
    }
}

/// The node a real Envoy sends, and `envoy --version`.
pub async fn capture(work: &Path) -> anyhow::Result<(Node, String)> {
    let dir = work.join("envoy-capture");
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("sds.sock");
    let _ = std::fs::remove_file(&socket);
    let token = dir.join("token");
    std::fs::write(&token, "not.a.jwt")?;
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let (tx, rx) = oneshot::channel();
    let service = Capture {
        first: Mutex::new(Some(tx)),
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let sds = SdsSource::GoogleGrpc {
        uds_path: socket.clone(),
        token_file: token,
    };
    let config = server_config(
        &sds,
        free_port(),
        free_port(),
        "spiffe://cluster.local/ns/bench/sa/any",
    );
    let envoy = EnvoyProc::start(&config).await.context("start Envoy")?;
    let first = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .map_err(|_| {
            anyhow!(
                "Envoy sent no SDS request within 30 s:\n{}",
                envoy.log_tail()
            )
        })?
        .map_err(|_| anyhow!("capture server ended"))?;
    drop(envoy);
    server.abort();
    let version = std::process::Command::new(crate::support::envoy::envoy_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let node = first
        .node
        .ok_or_else(|| anyhow!("Envoy's request carries no node"))?;
    Ok((node, version))
}

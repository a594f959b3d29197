//! The bench's SDS client: the library's (`node_agent::client::sds`) made to
//! look like a real Envoy on the wire, with Envoy's big node (see
//! `envoy_node`) in every request, and connecting as thousands of clients
//! at once must (a full listen backlog is retried, as gRPC does).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use node_agent::client::sds::{self, SdsClient, SecretStream};

/// One connection, like one Envoy's, retried for up to 30 s.
pub async fn connect(socket: &Path) -> anyhow::Result<SdsClient> {
    sds::connect_retrying(socket, Duration::from_secs(30))
        .await
        .context("connect to the agent's socket")
}

/// The node a real Envoy sends (see `envoy_node`), set once at start.
pub static ENVOY_NODE: std::sync::OnceLock<Node> = std::sync::OnceLock::new();

/// Envoy's node with this workload's id, as every request carries it.
pub fn node(node_id: &str) -> Node {
    let mut node = ENVOY_NODE.get().cloned().unwrap_or_default();
    node.id = node_id.to_string();
    node.cluster = "bench".into();
    node
}

/// The request Envoy sends first on a stream for `name`.
pub fn request(name: &str, node_id: &str) -> DiscoveryRequest {
    sds::request_with_node(node(node_id), &[name], None)
}

/// Opens a stream for `name` as Envoy does and sends the first request;
/// the stream's ACKs carry the same node.
pub async fn open(
    client: &mut SdsClient,
    jwt: &str,
    name: &str,
    node_id: &str,
) -> anyhow::Result<SecretStream> {
    SecretStream::open(client, Some(jwt), request(name, node_id))
        .await
        .context("open StreamSecrets")
}

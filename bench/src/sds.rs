//! The SDS side of the load generator, speaking as Envoy does: one HTTP/2
//! connection per workload over the agent's Unix socket, `StreamSecrets`
//! streams for `default` and `ROOTCA` carrying the workload's JWT in
//! `istio_sds_credentials_header-bin`, each response ACKed.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const HEADER: &str = "istio_sds_credentials_header-bin";

pub type Client = SecretDiscoveryServiceClient<Channel>;

/// One connection, like one Envoy's. A full listen backlog (EAGAIN on a Unix
/// socket) is retried, as gRPC does, for up to 30 s.
pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let path = socket.to_path_buf();
        let attempt = Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await;
        match attempt {
            Ok(ch) => return Ok(SecretDiscoveryServiceClient::new(ch)),
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e).context("connect to the agent's socket"),
        }
    }
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
    DiscoveryRequest {
        node: Some(node(node_id)),
        resource_names: vec![name.to_string()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    }
}

/// A request as a minimal client sends it: names and type, no node.
pub fn request_without_node(name: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: vec![name.to_string()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    }
}

/// The ACK Envoy sends for `resp` (with its node again).
pub fn ack(name: &str, node_id: &str, resp: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node(node_id)),
        resource_names: vec![name.to_string()],
        type_url: SECRET_TYPE.into(),
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        ..Default::default()
    }
}

pub fn with_jwt<T>(msg: T, jwt: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert_bin(
        HEADER,
        tonic::metadata::MetadataValue::from_bytes(jwt.as_bytes()),
    );
    req
}

/// An open `StreamSecrets` stream: the request side stays open (so the
/// stream does) until this is dropped.
pub struct OpenStream {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub inbound: Streaming<DiscoveryResponse>,
}

/// Opens a stream for `name` and sends the first request.
pub async fn open(
    client: &mut Client,
    jwt: &str,
    name: &str,
    node_id: &str,
) -> anyhow::Result<OpenStream> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(request(name, node_id)).await?;
    let inbound = client
        .stream_secrets(with_jwt(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            jwt,
        ))
        .await
        .context("open StreamSecrets")?
        .into_inner();
    Ok(OpenStream { tx, inbound })
}

impl OpenStream {
    /// The next response (a gRPC status ends the stream with an error).
    pub async fn next(&mut self) -> anyhow::Result<DiscoveryResponse> {
        match self.inbound.message().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => bail!("the stream ended without a response"),
            Err(s) => bail!("the stream ended with {:?}: {}", s.code(), s.message()),
        }
    }
}

/// The URI SAN of the leaf certificate of a `default` response, checking that
/// it is a complete secret (chain and key).
pub fn served_identity(resp: &DiscoveryResponse) -> anyhow::Result<String> {
    let any = resp
        .resources
        .first()
        .ok_or_else(|| anyhow!("no resource"))?;
    if any.type_url != SECRET_TYPE {
        bail!("resource of type {}", any.type_url);
    }
    let s = Secret::decode(any.value.as_slice())?;
    let Some(secret::Type::TlsCertificate(t)) = s.r#type else {
        bail!("{} is not a tls_certificate", s.name);
    };
    let inline = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| -> Vec<u8> {
        match d.as_ref().and_then(|d| d.specifier.as_ref()) {
            Some(Specifier::InlineBytes(b)) => b.clone(),
            Some(Specifier::InlineString(s)) => s.as_bytes().to_vec(),
            _ => Vec::new(),
        }
    };
    let key = inline(&t.private_key);
    if !String::from_utf8_lossy(&key).contains("PRIVATE KEY") {
        bail!("no private key");
    }
    let chain = inline(&t.certificate_chain);
    let pem = x509_parser::pem::Pem::iter_from_buffer(&chain)
        .next()
        .ok_or_else(|| anyhow!("empty chain"))??;
    let cert = pem.parse_x509()?;
    let san = cert
        .subject_alternative_name()?
        .ok_or_else(|| anyhow!("no SAN"))?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .ok_or_else(|| anyhow!("no URI SAN"))
}

//! An SDS client over the agent's Unix socket, speaking as Envoy does:
//! `StreamSecrets` (or `FetchSecrets`) for `default`, `ROOTCA` and `ALL`, the
//! workload's JWT in `istio_sds_credentials_header-bin` metadata, each
//! response ACKed with its version and nonce. Also reads what a response
//! serves: the certificate chain and key, the trusted CA, every trust
//! domain's roots, the SPIFFE ID.
//!
//! Connecting, requests and streams return errors rather than panicking:
//! `node-agent fetch` turns them into one-line messages, the tests into
//! assertions.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;
use zeroize::Zeroizing;

pub use crate::endpoint::CREDENTIAL_HEADER;
pub use crate::sds::resources::SECRET_TYPE_URL;

/// A gRPC SDS client on one HTTP/2 connection to the agent's socket.
pub type SdsClient = SecretDiscoveryServiceClient<Channel>;

/// Requests a [`SecretStream`] may queue before the agent reads them.
const QUEUED_REQUESTS: usize = 8;

/// Why connecting to the agent's socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be dialled: its `kind()` says whether it is
    /// missing, not ours to use, or nobody listens on it.
    #[error("cannot connect to {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The socket accepted the connection but HTTP/2 did not start on it.
    #[error("{} does not answer as an SDS server: {source}", path.display())]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// An SDS client on one connection to the agent at `socket` (see
/// [`channel`]).
pub async fn connect(socket: &Path) -> Result<SdsClient, ConnectError> {
    Ok(SecretDiscoveryServiceClient::new(channel(socket).await?))
}

/// One HTTP/2 connection to the agent at `socket`, for any gRPC client. The
/// socket is dialled first on its own, so that a missing socket, a refused
/// permission or a dead listener comes back as the [`io::Error`] that says
/// so; should the channel reconnect later, it dials the path again.
pub async fn channel(socket: &Path) -> Result<Channel, ConnectError> {
    let path = socket.to_path_buf();
    let first = UnixStream::connect(&path)
        .await
        .map_err(|source| ConnectError::Socket {
            path: path.clone(),
            source,
        })?;
    let first = Arc::new(Mutex::new(Some(first)));
    let dial = path.clone();
    let connector = tower::service_fn(move |_| {
        let (first, dial) = (first.clone(), dial.clone());
        async move {
            let taken = first.lock().expect("connector lock").take();
            let stream = match taken {
                Some(s) => s,
                None => UnixStream::connect(&dial).await?,
            };
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .map_err(|source| ConnectError::Transport { path, source })
}

/// [`connect`], retried every 5 ms for up to `within`, as gRPC retries a
/// connection: for a client among thousands dialling at once, whose dial
/// finds the listen backlog full (EAGAIN on a Unix socket) or is turned
/// away. Any failure is retried; the last one is returned.
pub async fn connect_retrying(socket: &Path, within: Duration) -> Result<SdsClient, ConnectError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match connect(socket).await {
            Ok(client) => return Ok(client),
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A request for `names` as a minimal client sends it (names and type, no
/// node); with `ack_of`, the ACK of that response (its version and nonce
/// echoed).
pub fn request(names: &[&str], ack_of: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        version_info: ack_of.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: ack_of.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// [`request`] carrying `node`, as Envoy sends every request of a stream.
pub fn request_with_node(
    node: Node,
    names: &[&str],
    ack_of: Option<&DiscoveryResponse>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node),
        ..request(names, ack_of)
    }
}

/// `req` again as the ACK of `resp`: same node and names, `resp`'s version
/// and nonce.
pub fn ack(req: &DiscoveryRequest, resp: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: resp.version_info.clone(),
        response_nonce: resp.nonce.clone(),
        ..req.clone()
    }
}

/// `msg` with the workload's JWT in the metadata Envoy sends it in
/// ([`CREDENTIAL_HEADER`]).
pub fn with_jwt<T>(msg: T, jwt: &str) -> tonic::Request<T> {
    with_optional_jwt(msg, Some(jwt))
}

/// `msg` with `jwt`, if any; without one the agent falls back on its own
/// token file, or refuses.
pub fn with_optional_jwt<T>(msg: T, jwt: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(jwt) = jwt {
        req.metadata_mut()
            .insert_bin(CREDENTIAL_HEADER, MetadataValue::from_bytes(jwt.as_bytes()));
    }
    req
}

/// One `FetchSecrets` call.
pub async fn fetch(
    client: &mut SdsClient,
    req: DiscoveryRequest,
    jwt: Option<&str>,
) -> Result<DiscoveryResponse, tonic::Status> {
    client
        .fetch_secrets(with_optional_jwt(req, jwt))
        .await
        .map(tonic::Response::into_inner)
}

/// Opens a `StreamSecrets` stream and sends nothing yet: requests go into
/// the returned sender, responses come out of the returned stream. The
/// stream stays open while the sender lives.
pub async fn open_stream(
    client: &mut SdsClient,
    jwt: Option<&str>,
) -> Result<(mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>), tonic::Status> {
    let (tx, rx) = mpsc::channel(QUEUED_REQUESTS);
    let inbound = client
        .stream_secrets(with_optional_jwt(ReceiverStream::new(rx), jwt))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

/// How a [`SecretStream`] ended instead of giving a response.
#[derive(Debug, thiserror::Error)]
pub enum StreamEnd {
    /// The agent ended the stream cleanly, without a status.
    #[error("the stream ended without a response")]
    Closed,
    /// The stream ended with a gRPC status (the agent's, or one the
    /// client's transport made).
    #[error("the stream ended with {:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

/// A `StreamSecrets` stream as Envoy holds one: a first request, then an
/// ACK of each response with the same node and names. The stream stays
/// open until this is dropped.
pub struct SecretStream {
    first: DiscoveryRequest,
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

impl SecretStream {
    /// Opens the stream with `jwt` (if any) and sends `first`.
    pub async fn open(
        client: &mut SdsClient,
        jwt: Option<&str>,
        first: DiscoveryRequest,
    ) -> Result<Self, tonic::Status> {
        let (requests, responses) = open_stream(client, jwt).await?;
        requests
            .send(first.clone())
            .await
            .map_err(|_| tonic::Status::cancelled("the request side of the stream closed"))?;
        Ok(Self {
            first,
            requests,
            responses,
        })
    }

    /// The next response.
    pub async fn next(&mut self) -> Result<DiscoveryResponse, StreamEnd> {
        match self.responses.message().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(StreamEnd::Closed),
            Err(s) => Err(StreamEnd::Status(s)),
        }
    }

    /// ACKs `resp`, so that the agent sends only changes from now on. A
    /// closed request side shows up as the stream ending, so it is not an
    /// error here.
    pub async fn ack(&self, resp: &DiscoveryResponse) {
        let _ = self.requests.send(ack(&self.first, resp)).await;
    }

    /// [`Self::ack`] without waiting: dropped if the queue is full, which
    /// with one ACK per response it is not.
    pub fn try_ack(&self, resp: &DiscoveryResponse) {
        let _ = self.requests.try_send(ack(&self.first, resp));
    }
}

/// Why a response's secrets cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("no resource")]
    NoResource,
    #[error("a resource of type {0:?}, not an SDS Secret")]
    NotASecret(String),
    #[error("a Secret that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A field of the secret holds no usable data.
    #[error("secret {name:?}: {field}: {problem}")]
    Data {
        name: String,
        field: &'static str,
        problem: String,
    },
    /// The secret is of another kind than asked for (`found` is its type, as
    /// Debug shows it).
    #[error("secret {name:?}: an unexpected secret type {found}")]
    Type { name: String, found: String },
    /// The served leaf certificate cannot be read, or names no SPIFFE ID.
    #[error("the leaf certificate: {0}")]
    Leaf(String),
}

/// The decoded `Secret` of one resource.
pub fn secret(any: &Any) -> Result<Secret, SecretError> {
    if any.type_url != SECRET_TYPE_URL {
        return Err(SecretError::NotASecret(any.type_url.clone()));
    }
    Ok(Secret::decode(any.value.as_slice())?)
}

/// Every resource of `resp`, decoded.
pub fn secrets(resp: &DiscoveryResponse) -> Result<Vec<Secret>, SecretError> {
    resp.resources.iter().map(secret).collect()
}

/// A `tls_certificate` secret (`default`): the chain, leaf first, and key.
pub struct TlsCertificate {
    pub chain_pem: String,
    pub key_pem: Zeroizing<String>,
}

/// What one secret serves.
pub enum Served {
    /// `default`: the workload's certificate.
    Certificate(TlsCertificate),
    /// `ROOTCA`: the trusted CA bundle of a validation context, as PEM.
    Roots(String),
    /// `ALL`: every trust domain (name without the scheme) and its roots
    /// (PEM), from the validation context's SPIFFE validator.
    TrustDomains(Vec<(String, String)>),
}

/// Reads what `s` serves, inline data only (the agent sends nothing else).
pub fn read(s: &Secret) -> Result<Served, SecretError> {
    let field = |field: &'static str, ds: &Option<DataSource>| {
        inline(ds).map_err(|problem| SecretError::Data {
            name: s.name.clone(),
            field,
            problem,
        })
    };
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => Ok(Served::Certificate(TlsCertificate {
            chain_pem: field("certificate_chain", &t.certificate_chain)?,
            key_pem: Zeroizing::new(field("private_key", &t.private_key)?),
        })),
        Some(secret::Type::ValidationContext(v)) => match crate::sds::all::read(v) {
            Ok(Some(domains)) => Ok(Served::TrustDomains(domains)),
            Ok(None) => Ok(Served::Roots(field("trusted_ca", &v.trusted_ca)?)),
            Err(problem) => Err(SecretError::Data {
                name: s.name.clone(),
                field: "custom_validator_config",
                problem,
            }),
        },
        other => Err(SecretError::Type {
            name: s.name.clone(),
            found: format!("{other:?}"),
        }),
    }
}

fn inline(ds: &Option<DataSource>) -> Result<String, String> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => {
            String::from_utf8(b.clone()).map_err(|_| "inline bytes that are not text".to_string())
        }
        Some(Specifier::InlineString(s)) => Ok(s.clone()),
        Some(other) => Err(format!("a data source that is not inline: {other:?}")),
        None => Err("no data".into()),
    }
}

/// The chain and key of a `tls_certificate` secret.
pub fn tls_certificate(s: &Secret) -> Result<TlsCertificate, SecretError> {
    match read(s)? {
        Served::Certificate(c) => Ok(c),
        Served::Roots(_) | Served::TrustDomains(_) => Err(wrong_type(s)),
    }
}

/// The trusted CA PEM of a validation-context secret (`ROOTCA`).
pub fn trusted_ca(s: &Secret) -> Result<String, SecretError> {
    match read(s)? {
        Served::Roots(pem) => Ok(pem),
        Served::Certificate(_) | Served::TrustDomains(_) => Err(wrong_type(s)),
    }
}

/// The trust domains and their roots (PEM) of an `ALL` secret, sorted by name.
pub fn trust_domains(s: &Secret) -> Result<Vec<(String, String)>, SecretError> {
    match read(s)? {
        Served::TrustDomains(domains) => Ok(domains),
        Served::Certificate(_) | Served::Roots(_) => Err(wrong_type(s)),
    }
}

fn wrong_type(s: &Secret) -> SecretError {
    SecretError::Type {
        name: s.name.clone(),
        found: format!("{:?}", s.r#type),
    }
}

/// The URI SANs and serial (hex, colon-separated) of the first certificate
/// in `pem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    pub uri_sans: Vec<String>,
    pub serial: String,
}

/// [`LeafFacts`] of the first certificate in `pem` (a chain's leaf).
pub fn leaf_facts(pem: &str) -> Result<LeafFacts, SecretError> {
    let leaf = |m: String| SecretError::Leaf(m);
    let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .ok_or_else(|| leaf("empty chain".into()))?
        .map_err(|e| leaf(e.to_string()))?;
    let cert = block.parse_x509().map_err(|e| leaf(e.to_string()))?;
    let uri_sans = cert
        .subject_alternative_name()
        .map_err(|e| leaf(e.to_string()))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(LeafFacts {
        uri_sans,
        serial: cert.raw_serial_as_string(),
    })
}

/// The certificate served first in `resp` (a `default` response's only
/// resource), with a PEM private key beside it.
fn served_certificate(resp: &DiscoveryResponse) -> Result<TlsCertificate, SecretError> {
    let s = secret(resp.resources.first().ok_or(SecretError::NoResource)?)?;
    let cert = tls_certificate(&s)?;
    if !cert.key_pem.contains("PRIVATE KEY") {
        return Err(SecretError::Data {
            name: s.name,
            field: "private_key",
            problem: "no PEM private key".into(),
        });
    }
    Ok(cert)
}

/// The URI SANs of the leaf served first in `resp`, which must be a
/// complete certificate (chain and key).
pub fn served_uris(resp: &DiscoveryResponse) -> Result<Vec<String>, SecretError> {
    Ok(leaf_facts(&served_certificate(resp)?.chain_pem)?.uri_sans)
}

/// The SPIFFE ID served first in `resp`: the leaf's first URI SAN.
pub fn served_identity(resp: &DiscoveryResponse) -> Result<String, SecretError> {
    served_uris(resp)?
        .into_iter()
        .next()
        .ok_or_else(|| SecretError::Leaf("no URI SAN".into()))
}

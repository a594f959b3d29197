//! The SDS client side of `fetch`: connects to the agent's Unix socket and
//! opens a `StreamSecrets` stream the way Envoy does (the workload's JWT in
//! `istio_sds_credentials_header-bin`), then ACKs each response.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tonic::Streaming;

use super::FetchError;
use crate::endpoint::CREDENTIAL_HEADER;
use crate::identity::Credential;
use crate::sds::resources::SECRET_TYPE_URL;

/// An open `StreamSecrets` stream.
pub struct SdsStream {
    names: Vec<String>,
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

fn request(names: &[String], ack_of: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "node-agent-fetch".into(),
            cluster: "node-agent-fetch".into(),
            ..Default::default()
        }),
        resource_names: names.to_vec(),
        type_url: SECRET_TYPE_URL.into(),
        version_info: ack_of.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: ack_of.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// Connects to `socket`, saying which of the usual reasons stops it.
async fn connect_socket(socket: &Path) -> Result<UnixStream, FetchError> {
    UnixStream::connect(socket).await.map_err(|e| {
        let path = socket.to_path_buf();
        match e.kind() {
            ErrorKind::NotFound => FetchError::NoSocket(path),
            ErrorKind::PermissionDenied => FetchError::SocketDenied(path, e),
            ErrorKind::ConnectionRefused => FetchError::NotListening(path),
            _ => FetchError::Connect(path, e),
        }
    })
}

impl SdsStream {
    /// Opens the stream and sends the first request for `names`.
    pub async fn open(
        socket: &Path,
        credential: Option<&Credential>,
        names: &[String],
    ) -> Result<Self, FetchError> {
        let first = connect_socket(socket).await?;
        // The first connection is the one just checked; later ones (tonic
        // reconnecting) dial the path again.
        let first = Arc::new(Mutex::new(Some(first)));
        let path: PathBuf = socket.to_path_buf();
        let connector = tower::service_fn(move |_| {
            let (first, path) = (first.clone(), path.clone());
            async move {
                let taken = first.lock().expect("connector lock").take();
                let stream = match taken {
                    Some(s) => s,
                    None => UnixStream::connect(&path).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let transport =
            |e: &dyn std::error::Error| FetchError::Transport(socket.to_path_buf(), error_chain(e));
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(connector)
            .await
            .map_err(|e| transport(&e))?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(4);
        tx.send(request(names, None))
            .await
            .expect("the receiver is held below");
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(c) = credential {
            req.metadata_mut().insert_bin(
                CREDENTIAL_HEADER,
                MetadataValue::from_bytes(c.expose().as_bytes()),
            );
        }
        let responses = client
            .stream_secrets(req)
            .await
            .map_err(|s| FetchError::from_status(s, socket, credential.is_some()))?
            .into_inner();
        Ok(Self {
            names: names.to_vec(),
            requests: tx,
            responses,
        })
    }

    /// The next response, `None` when the agent ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<DiscoveryResponse>, tonic::Status> {
        self.responses.message().await
    }

    /// ACKs `resp`, so that the agent sends only changes from now on.
    pub async fn ack(&self, resp: &DiscoveryResponse) {
        // A closed request side shows up as the stream ending; nothing to do here.
        let _ = self.requests.send(request(&self.names, Some(resp))).await;
    }
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

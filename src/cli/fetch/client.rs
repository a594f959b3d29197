//! How `fetch` opens its stream with the library's SDS client
//! ([`crate::client::sds`]): as the node `node-agent-fetch`, with the
//! workload's JWT if one was given, and each way of failing turned into the
//! [`FetchError`] that tells the operator what to do.

use std::io::ErrorKind;
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::Node;

use super::FetchError;
use crate::client::sds::{self, ConnectError, SecretStream};
use crate::identity::Credential;

/// The node `fetch` names itself as in every request.
fn node() -> Node {
    Node {
        id: "node-agent-fetch".into(),
        cluster: "node-agent-fetch".into(),
        ..Default::default()
    }
}

/// Connects to `socket`, opens a `StreamSecrets` stream and sends the first
/// request for `names`.
pub async fn open(
    socket: &Path,
    credential: Option<&Credential>,
    names: &[String],
) -> Result<SecretStream, FetchError> {
    let mut client = sds::connect(socket).await.map_err(|e| match e {
        ConnectError::Socket { path, source } => match source.kind() {
            ErrorKind::NotFound => FetchError::NoSocket(path),
            ErrorKind::PermissionDenied => FetchError::SocketDenied(path, source),
            ErrorKind::ConnectionRefused => FetchError::NotListening(path),
            _ => FetchError::Connect(path, source),
        },
        ConnectError::Transport { path, source } => {
            FetchError::Transport(path, error_chain(&source))
        }
    })?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let first = sds::request_with_node(node(), &names, None);
    SecretStream::open(&mut client, credential.map(Credential::expose), first)
        .await
        .map_err(|s| FetchError::from_status(s, socket, credential.is_some()))
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

//! The tests' side of the library's SDS client (`node_agent::client::sds`):
//! the same calls, panicking with a message where a test has nothing to
//! recover, plus what only tests need (a fake JWT, a bounded wait for the
//! next message).

use std::path::Path;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use node_agent::client::sds;
use tonic::Streaming;

// Not every binary that includes this file uses each of these.
#[allow(unused_imports)]
pub use node_agent::client::sds::{request, with_jwt, SdsClient};

pub const SECRET_TYPE: &str = sds::SECRET_TYPE_URL;

pub async fn connect(socket: &Path) -> SdsClient {
    sds::connect(socket)
        .await
        .expect("connect to the agent's socket")
}

/// The decoded secrets of a response; every resource must be a `Secret`.
pub fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    sds::secrets(resp).unwrap_or_else(|e| panic!("{e}"))
}

/// (certificate chain PEM, private key PEM) of a `default` secret.
pub fn tls_certificate(s: &Secret) -> (String, String) {
    let c = sds::tls_certificate(s).unwrap_or_else(|e| panic!("expected a tls_certificate: {e}"));
    (c.chain_pem, c.key_pem.to_string())
}

/// The trusted CA PEM of a `ROOTCA` secret.
pub fn trusted_ca(s: &Secret) -> String {
    sds::trusted_ca(s).unwrap_or_else(|e| panic!("expected a validation_context: {e}"))
}

/// URI SANs and serial of the first certificate in `pem`.
pub fn leaf_facts(pem: &str) -> (Vec<String>, String) {
    let f = sds::leaf_facts(pem).unwrap_or_else(|e| panic!("{e}"));
    (f.uri_sans, f.serial)
}

/// An unsigned-looking service-account JWT (the local CA does not verify
/// signatures; Vault tests use really signed ones).
pub fn fake_jwt(ns: &str, sa: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"iss":"kubernetes/serviceaccount","sub":"system:serviceaccount:{ns}:{sa}","kubernetes.io/serviceaccount/namespace":"{ns}"}}"#
    ));
    format!("{h}.{p}.c2lnbmF0dXJl")
}

/// Opens a `StreamSecrets` stream carrying `jwt`; requests go into the sender.
pub async fn open_stream(
    client: &mut SdsClient,
    jwt: &str,
) -> (
    tokio::sync::mpsc::Sender<DiscoveryRequest>,
    Streaming<DiscoveryResponse>,
) {
    sds::open_stream(client, Some(jwt))
        .await
        .expect("open StreamSecrets")
}

/// The URI SANs of the `default` certificate in a response (its first
/// resource; every resource must be a `Secret`).
pub fn served_uris(resp: &DiscoveryResponse) -> Vec<String> {
    leaf_facts(&tls_certificate(&secrets(resp)[0]).0).0
}

/// The next message of a stream within `within`, or a panic saying `what`
/// did not happen, with `log` (the agent's) for context.
pub async fn next_within(
    inbound: &mut Streaming<DiscoveryResponse>,
    within: std::time::Duration,
    what: &str,
    log: impl Fn() -> String,
) -> Result<DiscoveryResponse, tonic::Status> {
    use tokio_stream::StreamExt;
    match tokio::time::timeout(within, inbound.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("{what}: the stream ended without a status\n{}", log()),
        Err(_) => panic!("{what}: nothing within {within:?}\n{}", log()),
    }
}

/// FetchSecrets for `names` as the workload holding `jwt`.
pub async fn fetch(
    client: &mut SdsClient,
    names: &[&str],
    jwt: &str,
) -> Result<DiscoveryResponse, tonic::Status> {
    sds::fetch(client, request(names, None), Some(jwt)).await
}

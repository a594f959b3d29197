//! A Rust gRPC SDS client over the agent's Unix socket.

use std::path::Path;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

pub async fn connect(socket: &Path) -> SecretDiscoveryServiceClient<Channel> {
    let path = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::1]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the agent's socket");
    SecretDiscoveryServiceClient::new(channel)
}

/// A request for `names`, optionally echoing a previous response.
pub fn request(names: &[&str], ack_of: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE.into(),
        version_info: ack_of.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: ack_of.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// Adds the workload JWT as Envoy sends it.
pub fn with_jwt<T>(msg: T, jwt: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert_bin(
        "istio_sds_credentials_header-bin",
        tonic::metadata::MetadataValue::from_bytes(jwt.as_bytes()),
    );
    req
}

/// The decoded secrets of a response.
pub fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn inline(ds: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> String {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        Some(Specifier::InlineString(s)) => s.clone(),
        other => panic!("expected inline data, got {other:?}"),
    }
}

/// (certificate chain PEM, private key PEM) of a `default` secret.
pub fn tls_certificate(s: &Secret) -> (String, String) {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            (inline(&t.certificate_chain), inline(&t.private_key))
        }
        other => panic!("expected a tls_certificate, got {other:?}"),
    }
}

/// The trusted CA PEM of a `ROOTCA` secret.
pub fn trusted_ca(s: &Secret) -> String {
    match &s.r#type {
        Some(secret::Type::ValidationContext(v)) => inline(&v.trusted_ca),
        other => panic!("expected a validation_context, got {other:?}"),
    }
}

/// URI SANs and serial of the first certificate in `pem`.
pub fn leaf_facts(pem: &str) -> (Vec<String>, String) {
    let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let cert = block.parse_x509().unwrap();
    let uris = cert
        .subject_alternative_name()
        .unwrap()
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
    (uris, cert.raw_serial_as_string())
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
    client: &mut envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient<Channel>,
    jwt: &str,
) -> (
    tokio::sync::mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let inbound = client
        .stream_secrets(with_jwt(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            jwt,
        ))
        .await
        .expect("open StreamSecrets")
        .into_inner();
    (tx, inbound)
}

/// The URI SANs of the `default` certificate in a response (its first resource).
pub fn served_uris(resp: &DiscoveryResponse) -> Vec<String> {
    leaf_facts(&tls_certificate(&secrets(resp)[0]).0).0
}

/// The next message of a stream within `within`, or a panic saying `what`
/// did not happen, with `log` (the agent's) for context.
pub async fn next_within(
    inbound: &mut tonic::Streaming<DiscoveryResponse>,
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
    client: &mut envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient<Channel>,
    names: &[&str],
    jwt: &str,
) -> Result<DiscoveryResponse, tonic::Status> {
    client
        .fetch_secrets(with_jwt(request(names, None), jwt))
        .await
        .map(tonic::Response::into_inner)
}

//! The two SDS resources node-agent serves and how they are encoded.

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::secrets::WorkloadSecret;
use crate::trust::RootBundle;

/// Type URL of an SDS `Secret`.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The workload's certificate chain and key.
pub const DEFAULT: &str = "default";
/// The trusted root bundle.
pub const ROOTCA: &str = "ROOTCA";
/// Every resource name served, for error messages.
pub const SERVED: &[&str] = &[DEFAULT, ROOTCA];

/// Checks requested names: every one must be served, and there must be one.
pub fn check_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err(format!(
            "the request names no resource; this agent serves {}",
            SERVED.join(", ")
        ));
    }
    let unknown: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !SERVED.contains(n))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unknown resource name(s) {unknown:?}; this agent serves {}",
            SERVED.join(", ")
        ))
    }
}

/// What one response is built from: the identity's secret and the trust bundle.
pub struct Snapshot<'a> {
    pub secret: &'a WorkloadSecret,
    pub roots: &'a RootBundle,
}

/// The version of one resource, so that a stream can tell which resources changed.
pub fn resource_version(name: &str, snap: &Snapshot<'_>) -> String {
    if name == ROOTCA {
        snap.roots.version()
    } else {
        snap.secret.cert_version()
    }
}

fn inline(data: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(data.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// Encodes the named resource (already checked by [`check_names`]).
pub fn encode(name: &str, snap: &Snapshot<'_>) -> Any {
    let kind = if name == ROOTCA {
        secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(&snap.roots.pem()),
            ..Default::default()
        })
    } else {
        secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&snap.secret.chain_pem),
            private_key: inline(snap.secret.key.pkcs8_pem()),
            ..Default::default()
        })
    };
    let msg = Secret {
        name: name.to_string(),
        r#type: Some(kind),
    };
    Any {
        type_url: SECRET_TYPE_URL.to_string(),
        value: msg.encode_to_vec(),
    }
}

/// A full response for `names`; its version joins the resources' versions.
pub fn response(names: &[String], snap: &Snapshot<'_>, nonce: String) -> DiscoveryResponse {
    let version_info = names
        .iter()
        .map(|n| resource_version(n, snap))
        .collect::<Vec<_>>()
        .join("-");
    DiscoveryResponse {
        version_info,
        resources: names.iter().map(|n| encode(n, snap)).collect(),
        type_url: SECRET_TYPE_URL.to_string(),
        nonce,
        ..Default::default()
    }
}

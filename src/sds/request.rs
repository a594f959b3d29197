//! How SDS requests are read.

use crate::endpoint::framing::Request;

/// A `DiscoveryRequest` read without its `node` (field 2), which the agent
/// never uses and Envoy fills with ~60 KiB of extensions in every request:
/// the request reader drops it as it arrives, so it is never buffered.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestWithoutNode {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(string, repeated, tag = "3")]
    pub resource_names: Vec<String>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "6")]
    pub error_detail: Option<envoy_types::pb::google::rpc::Status>,
}

impl Request for RequestWithoutNode {
    const DROPPED_FIELD: Option<u32> = Some(2);
}

impl From<RequestWithoutNode> for envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
    fn from(r: RequestWithoutNode) -> Self {
        Self {
            version_info: r.version_info,
            resource_names: r.resource_names,
            type_url: r.type_url,
            response_nonce: r.response_nonce,
            error_detail: r.error_detail,
            ..Default::default()
        }
    }
}

/// A `DeltaDiscoveryRequest` read without its `node` (field 1), for the
/// same reason: Envoy sends it with the stream's first request, ~60 KiB.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaRequestWithoutNode {
    #[prost(string, tag = "2")]
    pub type_url: String,
    #[prost(string, repeated, tag = "3")]
    pub resource_names_subscribe: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub resource_names_unsubscribe: Vec<String>,
    #[prost(map = "string, string", tag = "5")]
    pub initial_resource_versions: std::collections::HashMap<String, String>,
    #[prost(string, tag = "6")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<envoy_types::pb::google::rpc::Status>,
}

impl Request for DeltaRequestWithoutNode {
    const DROPPED_FIELD: Option<u32> = Some(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use prost::Message;

    #[test]
    fn requests_decode_without_the_node_and_lose_nothing_else() {
        use envoy_types::pb::envoy::config::core::v3::{Extension, Node};
        use envoy_types::pb::google::rpc::Status as RpcStatus;
        let full = DiscoveryRequest {
            version_info: "v1".into(),
            node: Some(Node {
                id: "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local".into(),
                extensions: (0..500)
                    .map(|i| Extension {
                        name: format!("envoy.filters.example_{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            resource_names: vec!["default".into(), "ROOTCA".into()],
            type_url: super::super::resources::SECRET_TYPE_URL.into(),
            response_nonce: "n-1".into(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "rejected".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = full.encode_to_vec();
        assert!(bytes.len() > 10_000);
        let read: DiscoveryRequest = RequestWithoutNode::decode(bytes.as_slice()).unwrap().into();
        assert_eq!(read, DiscoveryRequest { node: None, ..full });
    }

    #[test]
    fn delta_requests_decode_without_the_node_and_lose_nothing_else() {
        use envoy_types::pb::envoy::config::core::v3::Node;
        use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
        let full = DeltaDiscoveryRequest {
            node: Some(Node {
                id: "x".repeat(20_000),
                ..Default::default()
            }),
            type_url: "t".into(),
            resource_names_subscribe: vec!["default".into()],
            resource_names_unsubscribe: vec!["ROOTCA".into()],
            initial_resource_versions: [("default".to_string(), "v1".to_string())].into(),
            response_nonce: "n".into(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: "m".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let read = DeltaRequestWithoutNode::decode(full.encode_to_vec().as_slice()).unwrap();
        assert_eq!(read.type_url, full.type_url);
        assert_eq!(read.resource_names_subscribe, full.resource_names_subscribe);
        assert_eq!(
            read.resource_names_unsubscribe,
            full.resource_names_unsubscribe
        );
        assert_eq!(
            read.initial_resource_versions,
            full.initial_resource_versions
        );
        assert_eq!(read.response_nonce, full.response_nonce);
        assert_eq!(read.error_detail, full.error_detail);
    }
}

//! Delta SDS (`DeltaSecrets`): the protocol rules seen from a Rust client
//! ([`protocol`]), and real Envoys on `api_type: DELTA_GRPC` sources
//! (`envoy_grpc` and `google_grpc`) doing mTLS through rotations and an agent
//! restart ([`envoys`]). This file holds the delta requests, the stream and
//! the readers of responses the client side uses.

use crate::support;

use std::time::Duration;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use support::agent::Agent;
use support::sds_client::*;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

mod envoys;
mod protocol;

const WAIT: Duration = Duration::from_secs(20);

/// A delta request: subscribe, unsubscribe, and optionally (N)ACK `nonce`.
fn delta(subscribe: &[&str], unsubscribe: &[&str], nonce: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.unwrap_or_default().to_string(),
        ..Default::default()
    }
}

fn nack(nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: "test NACK".into(),
            ..Default::default()
        }),
        ..delta(&[], &[], Some(nonce))
    }
}

struct DeltaStream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl DeltaStream {
    async fn open(client: &mut SecretDiscoveryServiceClient<Channel>, jwt: Option<&str>) -> Self {
        Self::try_open(client, jwt)
            .await
            .expect("open DeltaSecrets")
    }

    /// Opens a stream, or the status it was refused with.
    async fn try_open(
        client: &mut SecretDiscoveryServiceClient<Channel>,
        jwt: Option<&str>,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        let body = tokio_stream::wrappers::ReceiverStream::new(rx);
        let req = match jwt {
            Some(jwt) => with_jwt(body, jwt),
            None => tonic::Request::new(body),
        };
        let rx = client.delta_secrets(req).await?.into_inner();
        Ok(Self { tx, rx })
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.expect("stream open");
    }

    /// The next message, or a panic naming `what` with the agent's log.
    async fn next(
        &mut self,
        what: &str,
        agent: &Agent,
    ) -> Result<DeltaDiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(WAIT, self.rx.next()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("{what}: the stream ended without a status\n{}", agent.log()),
            Err(_) => panic!("{what}: nothing within {WAIT:?}\n{}", agent.log()),
        }
    }

    /// The status the stream ends with next, or a panic naming `what`.
    async fn next_err(&mut self, what: &str, agent: &Agent) -> tonic::Status {
        match self.next(what, agent).await {
            Err(status) => status,
            Ok(resp) => panic!(
                "{what}: answered {}\n{}",
                summary(&shorten_names(resp)),
                agent.log()
            ),
        }
    }

    async fn next_ok(&mut self, what: &str, agent: &Agent) -> DeltaDiscoveryResponse {
        self.next(what, agent)
            .await
            .unwrap_or_else(|s| panic!("{what}: {s:?}\n{}", agent.log()))
    }
}

/// (name, version) of each resource in a response, checking each decodes as
/// the Secret of that name.
fn carried(resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    assert_eq!(resp.type_url, SECRET_TYPE);
    resp.resources
        .iter()
        .map(|r| {
            let any = r.resource.as_ref().expect("resource body");
            assert_eq!(any.type_url, SECRET_TYPE);
            let secret = Secret::decode(any.value.as_slice()).unwrap();
            assert_eq!(secret.name, r.name, "resource and secret names agree");
            assert!(!r.version.is_empty(), "every resource has a version");
            (r.name.clone(), r.version.clone())
        })
        .collect()
}

fn secret_of(resp: &DeltaDiscoveryResponse, name: &str) -> Secret {
    let r = resp
        .resources
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no {name} in {}", summary(resp)));
    Secret::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap()
}

/// A short description of a response for assertion messages (no key bytes).
fn summary(resp: &DeltaDiscoveryResponse) -> String {
    let carried: Vec<(&str, &str)> = resp
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    format!(
        "resources {carried:?}, removed {:?}, nonce {}",
        resp.removed_resources, resp.nonce
    )
}

/// A response with the names it carries cut short, for a panic message.
fn shorten_names(mut resp: DeltaDiscoveryResponse) -> DeltaDiscoveryResponse {
    for n in &mut resp.removed_resources {
        n.truncate(40);
    }
    resp
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    carried(resp).into_iter().map(|(n, _)| n).collect()
}

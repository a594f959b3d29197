//! The SDS server seen from a Rust gRPC client (the library's own,
//! `node_agent::client::sds`): [`protocol`] (FetchSecrets, the stream state
//! machine with its ACKs, NACKs and stale nonces, names, half-close, request
//! budgets), [`credentials`] (which JWT a request is served for, and the token
//! file), [`socket`] (the socket's lifecycle and the settings that place it or
//! stop the agent), [`cache`] (renewals pushed to open streams, eviction and
//! idle identities, metrics). This file holds the helpers they share.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::sds_client::*;

mod cache;
mod credentials;
mod protocol;
mod socket;

fn local_agent() -> Agent {
    Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "1h".into()),
    ])
}

/// The resource names of a response, in order.
fn names_of(
    resp: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<String> {
    secrets(resp).into_iter().map(|s| s.name).collect()
}

/// The next response on a stream (a bounded wait, so a hang fails the test).
async fn next(
    inbound: &mut tonic::Streaming<
        envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
    >,
    what: &str,
    agent: &Agent,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
    next_within(inbound, Duration::from_secs(10), what, || agent.log())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", agent.log()))
}

fn nack(
    names: &[&str],
    of: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
    let mut nack = request(names, Some(of));
    nack.error_detail = Some(envoy_types::pb::google::rpc::Status {
        code: 3,
        message: "Failed to load certificate chain from <inline>".into(),
        ..Default::default()
    });
    nack
}

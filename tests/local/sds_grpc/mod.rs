//! The SDS server of the real binary seen from a Rust gRPC client (the
//! library's own, `node_agent::client::sds`): [`protocol`] (FetchSecrets,
//! request budgets), [`token_file`] (`WORKLOAD_TOKEN_PATH`), [`socket`] (the
//! socket's lifecycle and the settings that place it or stop the agent),
//! [`cache`] (eviction and idle identities, a fetch waiting on Vault,
//! metrics), [`flow`] (HTTP/2 flow control as a connection starts). The
//! protocol's rules (ACKs, NACKs, stale nonces, names,
//! half-close, renewals pushed, credentials refused) are tested in process,
//! in `src/sds/tests/`. This file holds the helpers they share.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::sds_client::*;

mod cache;
mod flow;
mod protocol;
mod socket;
mod token_file;

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

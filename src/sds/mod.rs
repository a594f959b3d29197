//! The SDS protocol (`envoy.service.secret.v3.SecretDiscoveryService`),
//! served through the agent's endpoint ([`crate::endpoint`]: the socket, the
//! bounds, framing) with the identity side of each stream in its
//! [`crate::driver::Driver`]:
//!
//! - [`service`]: the routes, `FetchSecrets`, and starting the server.
//! - [`stream`]: one `StreamSecrets` stream, the xDS state machine.
//! - [`delta`]: one `DeltaSecrets` stream, incremental xDS.
//! - [`request`]: how a `DiscoveryRequest` is read (without Envoy's node).
//! - [`resources`]: the resources served, and the checks on names;
//!   [`all`]: the `ALL` resource, every trust domain's roots; [`encoded`]:
//!   each resource encoded once per version, and the responses made of them.
//! - [`sent`]: the version a stream last sent of each resource.

pub mod all;
mod delta;
pub mod encoded;
pub mod request;
pub mod resources;
pub mod sent;
pub mod service;
mod stream;
#[cfg(test)]
mod tests;

pub use crate::endpoint::{CREDENTIAL_HEADER, CREDENTIAL_HEADER_1_1};
pub use service::{serve, serve_with_limits, serve_within, SdsService};

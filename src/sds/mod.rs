//! The SDS server (`envoy.service.secret.v3.SecretDiscoveryService`) on a
//! Unix socket.
//!
//! Every workload that can reach the socket may be hostile, so everything a
//! client can make the agent hold is bounded, and a client past a bound gets a
//! status naming the setting:
//!
//! - [`connection`]: each accepted connection gets an id and its own state
//!   (stream count, the JWTs it presented, its login budget); connections
//!   past `SDS_MAX_CONNECTIONS` are closed at once.
//! - [`limits`]: streams per connection and in total, the first-request
//!   deadline, and one warning per interval for each bound that is hit.
//! - [`framing`]: reading request messages with bounded size, time and
//!   buffer (a malformed one is `INVALID_ARGUMENT`).
//! - [`server`]: the gRPC routes, the HTTP/2 settings, `FetchSecrets`.
//! - [`codec`]: protobuf in and out, a malformed request `INVALID_ARGUMENT`.
//! - [`stream`]: one `StreamSecrets` stream, the xDS state machine.
//! - [`delta`]: one `DeltaSecrets` stream, incremental xDS.
//! - [`serving`]: what a stream of either protocol holds of its identity:
//!   its subscription, and the fetch of a new one under the login budget.
//! - [`credential`]: where a request's JWT comes from.
//! - [`resources`]: the two resources served, and the checks on names.

pub mod codec;
pub mod connection;
pub mod credential;
mod delta;
pub mod framing;
pub mod limits;
pub mod resources;
pub mod server;
pub(crate) mod serving;
mod stream;
pub mod uds;

pub use credential::{CREDENTIAL_HEADER, CREDENTIAL_HEADER_1_1};
pub use server::{serve, serve_with_limits, serve_within};

//! What every socket of the agent does before a protocol sees a request:
//! the Unix socket, connection admission and the bounds, request framing,
//! the codec, where a request's credential comes from, and the HTTP/2
//! server. SDS ([`crate::sds`]) and the SPIFFE Workload API
//! ([`crate::workload_api`]) are both served through it.
//!
//! Every workload that can reach a socket may be hostile, so everything a
//! client can make the agent hold is bounded, and a client past a bound gets
//! a status naming the setting:
//!
//! - [`socket`]: binding a socket of the agent, never stealing a live one.
//! - [`connection`]: each accepted connection gets an id and its own state
//!   (its peer, stream count, its login budget); at
//!   `SDS_MAX_CONNECTIONS` the oldest connection that has proven nothing
//!   makes room, else a new one is closed at once; a connection that opens
//!   no stream within `SDS_HANDSHAKE_TIMEOUT` is closed.
//! - [`peer`], [`peers`]: whose each connection is (a pod, by default), and
//!   each peer's share of connections, streams, logins and identities, kept
//!   across its reconnects.
//! - [`logins`]: what a JWT costs before it reaches the CA; a JWT is known
//!   only once the CA has proven it.
//! - [`unproven`]: what has proven no credential holds its place only until
//!   a newcomer needs it.
//! - [`limits`]: streams per connection and in total, the first-request
//!   deadline, and what a stream holds of them ([`limits::StreamGuard`]).
//! - [`caps`]: a socket's own caps, taken before the shared bounds.
//! - [`warn`]: one warning per interval for each bound that is hit.
//! - [`framing`]: reading request messages with bounded size, time and
//!   buffer; a failure is a typed [`framing::FramingError`].
//! - [`codec`]: protobuf in and out, a malformed request `INVALID_ARGUMENT`.
//! - [`credential`]: where a request's JWT comes from.
//! - [`responses`]: a stream's responses as the HTTP/2 body, its loop
//!   polled in place (no task of its own).
//! - [`server`]: the HTTP/2 settings, the accept loop, a stream's admission
//!   ([`server::Endpoint::admit`]) and a method's response.

pub mod caps;
pub mod codec;
pub mod connection;
pub mod credential;
pub mod framing;
pub mod limits;
pub mod logins;
pub mod peer;
pub mod peers;
pub mod responses;
pub mod server;
pub mod socket;
pub mod unproven;
pub mod warn;

pub use credential::{CREDENTIAL_HEADER, CREDENTIAL_HEADER_1_1};
pub use server::{serve, Endpoint};

//! Clients of the agent's own sockets. [`sds`] speaks SDS over the Unix
//! socket as Envoy does; `node-agent fetch`, the integration tests and the
//! benchmark's load generator all use it, so that the three see the agent
//! through one implementation of the protocol.

pub mod sds;

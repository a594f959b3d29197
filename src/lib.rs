//! node-agent: gives every workload in a service mesh its X.509 identity.
//!
//! Data flow: a Unix socket → [`endpoint`] (admission, bounds, framing) →
//! a protocol ([`sds`], [`workload_api`]; [`output`] writes files instead)
//! → the stream [`driver`] (the identity side of every stream) →
//! [`secrets`] manager (cache per identity, one fetch in flight) →
//! [`trust`] bundle (`ROOTCA`, the CA's roots) and [`ca`] providers (local,
//! Vault) → [`crypto`] (keys, CSR, checks). [`agent`] wires them from
//! [`config`]. [`identity`] turns a workload's JWT into its SPIFFE ID;
//! [`clock`] is the time they all read; [`memory`] gives freed memory back;
//! [`memo`] keeps what is derived from an immutable value beside it.
//! [`status`] serves health, [`metrics`] and debug pages over HTTP. [`cli`]
//! holds the operator subcommands (`vault-setup`, `fetch`).

pub mod agent;
pub mod backoff;
pub mod ca;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod driver;
pub mod duration;
pub mod endpoint;
pub mod identity;
pub mod memo;
pub mod memory;
pub mod metrics;
pub mod output;
pub mod sds;
pub mod secrets;
pub mod status;
pub mod trust;
pub mod workload_api;

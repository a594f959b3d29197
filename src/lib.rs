//! node-agent: gives every workload in a service mesh its X.509 identity.
//!
//! Data flow: [`config`] → [`sds`] server (one task per stream) →
//! [`secrets`] manager (cache per identity, one fetch in flight) →
//! [`trust`] bundle (`ROOTCA`, the CA's roots) → [`ca`] providers (local,
//! Vault) → [`crypto`] (keys, CSR, checks). [`identity`] turns a
//! workload's JWT into its SPIFFE ID; [`clock`] is the time they all read.
//! [`status`] serves health, [`metrics`] and debug pages over HTTP. [`cli`]
//! holds the operator subcommands (`vault-setup`, `fetch`).

pub mod agent;
pub mod backoff;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod duration;
pub mod identity;
pub mod metrics;
pub mod output;
pub mod sds;
pub mod secrets;
pub mod status;
pub mod trust;
pub mod workload_api;

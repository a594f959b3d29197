//! node-agent: gives every workload in a service mesh its X.509 identity.
//!
//! Data flow: [`config`] → [`sds`] server (one task per stream) →
//! [`secrets`] manager (cache per identity, one fetch in flight) →
//! [`ca`] providers (local, Vault) → [`crypto`] (keys, CSR, checks).
//! [`identity`] turns a workload's JWT into its SPIFFE ID.

pub mod agent;
pub mod backoff;
pub mod ca;
pub mod config;
pub mod crypto;
pub mod duration;
pub mod identity;
pub mod sds;
pub mod secrets;

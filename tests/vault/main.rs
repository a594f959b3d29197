//! Integration tests against a real OpenBao (one dev server per test): the
//! VaultCA client, bad answers from Vault, credential lifetimes, status and
//! metrics, pkilint's verdict on what a vault-setup role issues, and
//! `node-agent bundle-endpoint` serving the PKI mount's roots.

#[path = "../support/mod.rs"]
mod support;

mod bundle_endpoint;
mod credential_lifetime;
mod pkilint;
mod status;
mod vault_bad_answers;
mod vault_ca;
mod vault_client;

//! Integration tests against a real OpenBao (one dev server per test): the
//! VaultCA client, bad answers from Vault, credential lifetimes, status and
//! metrics.

#[path = "../support/mod.rs"]
mod support;

mod credential_lifetime;
mod status;
mod vault_bad_answers;
mod vault_ca;
mod vault_client;

//! What an operator runs: the node-agent CLI (fetch, vault-setup), the
//! deploy/ manifests and container image, quickstart.sh.

#[path = "../support/mod.rs"]
mod support;

mod cli_fetch;
mod cli_vault_setup;
mod deploy;
mod quickstart;

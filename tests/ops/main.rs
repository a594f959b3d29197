//! What an operator runs: the node-agent CLI (fetch, vault-setup), the
//! deploy/ manifests and container image, the monitoring (alert rules and
//! dashboard, against a real Prometheus), quickstart.sh.

#[path = "../support/mod.rs"]
mod support;

mod cli_fetch;
mod cli_vault_setup;
mod deploy;
mod monitoring;
mod quickstart;

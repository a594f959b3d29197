//! The `node-agent` subcommands, for operators: `vault-setup` configures
//! Vault/OpenBao as the mesh CA, `fetch` shows what the agent serves a
//! workload's Envoy, `bundle-endpoint` serves the mesh's roots to federated
//! trust domains. `node-agent` without a subcommand runs the agent
//! (src/main.rs).
//!
//! Each prints a one-line error on stderr and exits 1 when something fails,
//! 2 when the command line or a file it names cannot be used.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

pub mod bundle_endpoint;
pub mod fetch;
pub mod vault_setup;

/// A subcommand of `node-agent`.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Configure Vault/OpenBao as the mesh CA (PKI mount, role bound to each
    /// workload's own service account, policy, auth method and role), then
    /// print the settings node-agent needs. Safe to run again.
    VaultSetup(Box<vault_setup::Args>),
    /// Ask the agent's SDS socket for a workload's certificate and trust
    /// bundle, as Envoy does, and show them.
    Fetch(fetch::Args),
    /// Serve the PKI mount's roots as a SPIFFE bundle over HTTPS, for
    /// SPIRE servers and other meshes that federate with this trust domain.
    BundleEndpoint(bundle_endpoint::Args),
}

impl Command {
    /// Whether it runs as a server that logs like the agent (`LOG_LEVEL`,
    /// `LOG_FORMAT`) rather than printing its outcome.
    pub fn logs(&self) -> bool {
        matches!(self, Command::BundleEndpoint(_))
    }
}

/// Runs a subcommand to completion and returns its exit code.
pub fn run(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("node-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::VaultSetup(args) => runtime.block_on(vault_setup::run(*args)),
        Command::Fetch(args) => runtime.block_on(fetch::run(args)),
        Command::BundleEndpoint(args) => runtime.block_on(bundle_endpoint::run(args)),
    }
}

/// clap value parser for Go durations (`24h`, `90m`, `1h30m`), the spelling
/// node-agent's settings use.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse_go_duration(s).map_err(|e| e.to_string())
}

/// A duration the way an operator reads it: `87600h`, `24h`, `1h30m`, `45s`.
pub(crate) fn show_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// One line for an error message: newlines and runs of spaces folded.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_as_written() {
        for (s, shown) in [
            ("87600h", "87600h"),
            ("90m", "1h30m"),
            ("45s", "45s"),
            ("0", "0s"),
        ] {
            assert_eq!(show_duration(parse_duration(s).unwrap()), shown);
        }
        assert!(parse_duration("1 day").is_err());
        assert_eq!(one_line("a\n  b\tc "), "a b c");
    }
}

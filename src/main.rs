//! The `node-agent` binary: settings from the environment (Istio 1.1's names)
//! and a few flags; logs to stderr; stops cleanly on SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use node_agent::config::Config;

/// Serves Envoy's SDS with workload certificates signed by Vault/OpenBao or a
/// local CA. Every setting is an environment variable; see README.md.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Every other setting is an environment variable, with Istio 1.1's names:\n  \
        CA_PROVIDER (VaultCA | LocalCA), CA_ADDR, VAULT_ADDR, VAULT_AUTH_PATH, VAULT_ROLE,\n  \
        VAULT_SIGN_CSR_PATH, VAULT_TLS_ROOT_CERT, VAULT_NAMESPACE, VAULT_CONNECT_TIMEOUT,\n  \
        VAULT_REQUEST_TIMEOUT, TRUST_DOMAIN, KEY_TYPE, SECRET_TTL, SECRET_GRACE_PERIOD_RATIO,\n  \
        SECRET_GRACE_PERIOD_RATIO_JITTER, CA_MAX_CONCURRENCY, SECRET_EVICTION_PERIOD,\n  \
        LOCAL_CA_DIR, WORKLOAD_TOKEN_PATH, LOG_LEVEL.\nSee README.md for their meaning and defaults."
)]
struct Args {
    /// SDS Unix socket path [env: WORKLOAD_UDS_PATH] [default: /var/run/sds/uds_path]
    #[arg(
        long = "workload-uds-path",
        alias = "workloadUDSPath",
        value_name = "PATH"
    )]
    workload_uds_path: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();

    let config = match Config::from_env(args.workload_uds_path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("node-agent failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        let _ = tx.send(true);
    });
    node_agent::agent::run(config, rx).await
}

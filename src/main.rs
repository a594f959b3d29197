//! The `node-agent` binary: settings from the environment (Istio 1.1's names)
//! and a few flags; logs to stderr; stops cleanly on SIGTERM or SIGINT.
//! The operator subcommands (`vault-setup`, `fetch`, `bundle-endpoint`) live
//! in `node_agent::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use node_agent::config::observe::{parse_status_addr, LogFormat, LogSettings};
use node_agent::config::{Config, ConfigError};

/// Serves Envoy's SDS with workload certificates signed by Vault/OpenBao or a
/// local CA. Every setting is an environment variable; see docs/settings.md.
/// Without a subcommand it runs the agent.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    after_help = "Every other setting is an environment variable, with Istio 1.1's names:\n  \
        CA_PROVIDER (VaultCA | LocalCA), CA_ADDR, VAULT_ADDR, VAULT_AUTH_PATH, VAULT_ROLE,\n  \
        VAULT_SIGN_CSR_PATH, VAULT_PKI_MOUNT, VAULT_TLS_ROOT_CERT, VAULT_NAMESPACE,\n  \
        VAULT_CONNECT_TIMEOUT, VAULT_REQUEST_TIMEOUT, TRUST_DOMAIN, KEY_TYPE, SECRET_TTL,\n  \
        SECRET_GRACE_PERIOD_RATIO, SECRET_GRACE_PERIOD_RATIO_JITTER, CA_MAX_CONCURRENCY,\n  \
        SECRET_EVICTION_PERIOD, MAX_IDENTITIES, MAX_JWTS_PER_IDENTITY, TRUST_REFRESH_INTERVAL,\n  \
        TRUST_ROOT_RETENTION, TRUST_EXTRA_ROOTS, LOCAL_CA_DIR, WORKLOAD_TOKEN_PATH,\n  \
        SOCKET_DIR_CHECK, WORKLOAD_API_SOCKET, WORKLOAD_API_MAX_CONNECTIONS,\n  \
        WORKLOAD_API_MAX_STREAMS, OUTPUT_CERTS, STATUS_ADDR, STATUS_DEBUG_FROM,\n  \
        STATUS_MAX_CONNECTIONS, STATUS_PROBE_CONNECTIONS, STATUS_MAX_PENDING_CONNECTIONS,\n  \
        STATUS_HEADER_TIMEOUT, STATUS_MAX_HEADER_BYTES, STATUS_CONNECTION_LIFETIME, LOG_LEVEL,\n  \
        LOG_FORMAT; the SDS server's bounds (which the Workload API shares):\n  \
        SDS_MAX_CONNECTIONS, SDS_MAX_STREAMS,\n  \
        SDS_CONNECTION_MAX_STREAMS, SDS_FIRST_REQUEST_TIMEOUT, SDS_KEEPALIVE_INTERVAL,\n  \
        SDS_KEEPALIVE_TIMEOUT, SDS_MAX_REQUEST_BYTES, SDS_MAX_BUFFERED_REQUEST_BYTES,\n  \
        SDS_MAX_HEADER_BYTES, SDS_MAX_RESOURCE_NAMES, SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT,\n  \
        SDS_CONNECTION_NEW_JWT_BURST, SDS_CONNECTION_NEW_JWT_INTERVAL, SDS_PEER,\n  \
        SDS_PEER_MAX_CONNECTIONS, SDS_PEER_MAX_STREAMS, SDS_PEER_MAX_LOGINS_IN_FLIGHT,\n  \
        SDS_PEER_NEW_JWT_BURST, SDS_PEER_NEW_JWT_INTERVAL, SDS_PEER_MAX_IDENTITIES.\n\
        See docs/settings.md for their meaning and defaults."
)]
struct Args {
    /// SDS Unix socket path [env: WORKLOAD_UDS_PATH] [default: /var/run/sds/uds_path]
    #[arg(
        long = "workload-uds-path",
        alias = "workloadUDSPath",
        value_name = "PATH"
    )]
    workload_uds_path: Option<PathBuf>,

    /// Status server (health, metrics, debug) address; empty turns it off
    /// [env: STATUS_ADDR] [default: 0.0.0.0:15020]
    #[arg(long = "status-addr", value_name = "IP:PORT")]
    status_addr: Option<String>,

    #[command(subcommand)]
    command: Option<node_agent::cli::Command>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(command) = args.command {
        if command.logs() {
            if let Err(e) = init_logging() {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        }
        return node_agent::cli::run(command);
    }
    let config = init_logging()
        .and_then(|()| Config::from_env(args.workload_uds_path))
        .and_then(|mut c| {
            if let Some(flag) = &args.status_addr {
                c.observe.status_addr = parse_status_addr("--status-addr", flag)?;
            }
            Ok(c)
        });
    let config = match config {
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

/// Logs to stderr: human-readable lines, or one JSON object per line with
/// `LOG_FORMAT=json`; filtered by `LOG_LEVEL` (or `RUST_LOG`), `info` by
/// default. An invalid `LOG_FORMAT` is returned after text logging is set up,
/// so that it is reported like any other bad setting.
fn init_logging() -> Result<(), ConfigError> {
    let settings = LogSettings::from_env();
    let wanted = settings.as_ref().ok().and_then(|s| s.filter.clone());
    let parsed = wanted
        .as_deref()
        .map(tracing_subscriber::EnvFilter::try_new);
    let (filter, bad_filter) = match parsed {
        Some(Ok(f)) => (f, None),
        Some(Err(e)) => (tracing_subscriber::EnvFilter::new("info"), Some(e)),
        None => (tracing_subscriber::EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match settings.as_ref().map(|s| s.format) {
        Ok(LogFormat::Json) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        _ => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    if let (Some(e), Some(f)) = (bad_filter, wanted) {
        tracing::warn!("LOG_LEVEL/RUST_LOG {f:?} is not a valid log filter ({e}); logging at info");
    }
    settings.map(|_| ())
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

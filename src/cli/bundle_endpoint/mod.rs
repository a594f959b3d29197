//! `node-agent bundle-endpoint`: serves this mesh's roots, the PKI mount's
//! (read as every agent reads them for `ROOTCA`), as a SPIFFE bundle over
//! HTTPS with a certificate of its own (the `https_web` profile), so that a
//! SPIRE server or another mesh can federate with this trust domain.
//!
//! - [`settings`]: its flags and the agent's Vault settings it reuses.
//! - [`bundle`]: the bundle served, its `spiffe_sequence`, the logs of changes.
//! - [`refresh`]: reading the mount, and keeping the last good bundle.
//! - [`tls`]: the certificate and key, re-read when they change on disk.
//! - [`server`]: the HTTPS server and its bounds.
//!
//! It comes up whether or not Vault answers: until the first read succeeds
//! it answers 503 (and is not ready), logging each failed read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args as ClapArgs;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::ca::vault::{VaultCa, VaultSetupError};
use crate::cli::parse_duration;
use crate::config::ConfigError;

pub mod bundle;
pub mod refresh;
pub mod server;
pub mod settings;
pub mod tls;

/// `node-agent bundle-endpoint` flags; each has an environment variable.
#[derive(ClapArgs, Debug)]
#[command(
    after_help = "Vault is reached as the agent reaches it: VAULT_ADDR (or CA_ADDR), \
    VAULT_PKI_MOUNT (or VAULT_SIGN_CSR_PATH), VAULT_TLS_ROOT_CERT, VAULT_TLS_SYSTEM_ROOTS, \
    VAULT_NAMESPACE, VAULT_CONNECT_TIMEOUT, VAULT_REQUEST_TIMEOUT; the mount is read every \
    TRUST_REFRESH_INTERVAL (default 5m). No Vault token is needed. See docs/bundle-endpoint.md."
)]
pub struct Args {
    /// Address to serve HTTPS on
    #[arg(
        long,
        env = "BUNDLE_ENDPOINT_ADDR",
        default_value = "0.0.0.0:8443",
        value_name = "IP:PORT"
    )]
    pub addr: SocketAddr,

    /// PEM file of the TLS certificate (chain, leaf first); re-read when it changes
    #[arg(long, env = "BUNDLE_ENDPOINT_CERT", value_name = "FILE")]
    pub cert: PathBuf,

    /// PEM file of the TLS certificate's private key; re-read when it changes
    #[arg(long, env = "BUNDLE_ENDPOINT_KEY", value_name = "FILE")]
    pub key: PathBuf,

    /// How often federated peers should fetch the bundle (its spiffe_refresh_hint)
    #[arg(
        long,
        env = "BUNDLE_ENDPOINT_REFRESH_HINT",
        default_value = "5m",
        value_parser = parse_hint,
        value_name = "DURATION"
    )]
    pub refresh_hint: Duration,

    /// Most connections open at once; one more is closed at once
    #[arg(
        long,
        env = "BUNDLE_ENDPOINT_MAX_CONNECTIONS",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..=65536),
        value_name = "N"
    )]
    pub max_connections: u32,
}

fn parse_hint(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s (the hint is in whole seconds)".into());
    }
    Ok(d)
}

/// Why `bundle-endpoint` stopped.
#[derive(Debug, thiserror::Error)]
pub enum BundleEndpointError {
    #[error("{0}")]
    Setting(#[from] ConfigError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Vault(#[from] VaultSetupError),
    #[error("cannot set up TLS: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
}

impl BundleEndpointError {
    /// 2 for settings and files that cannot be used, else 1.
    fn exit_code(&self) -> u8 {
        match self {
            Self::Setting(_) | Self::Tls(_) | Self::Vault(_) => 2,
            Self::TlsConfig(_) | Self::Listen { .. } | Self::Signals(_) => 1,
        }
    }
}

/// Runs until SIGTERM or SIGINT (exit 0), or fails at start (a one-line
/// error, exit 2 for settings, 1 otherwise).
pub async fn run(args: Args) -> ExitCode {
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("bundle endpoint: {}", crate::cli::one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

async fn serve(args: Args) -> Result<(), BundleEndpointError> {
    let vault = settings::vault_settings(|k| std::env::var(k).ok())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let files = tls::CertFiles {
        cert: args.cert.clone(),
        key: args.key.clone(),
    };
    let cert = Arc::new(tls::ReloadingCert::load(files, provider.clone())?);
    let mut tls_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    tls_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));

    let mount = vault.vault.pki_mount.clone();
    let vault_addr = vault.vault.addr.clone();
    let ca = Arc::new(VaultCa::new(vault.vault)?);
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|source| BundleEndpointError::Listen {
            addr: args.addr,
            source,
        })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).map_err(BundleEndpointError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(BundleEndpointError::Signals)?;
    tracing::info!(
        addr = %args.addr,
        vault = %vault_addr,
        mount = %mount,
        refresh_interval_s = vault.refresh_interval.as_secs(),
        refresh_hint_s = args.refresh_hint.as_secs(),
        "bundle endpoint: serving the PKI mount's roots as a SPIFFE bundle on https://{}/",
        args.addr
    );

    let state = Arc::new(bundle::BundleState::new(args.refresh_hint));
    let refresher = tokio::spawn(refresh::run(
        ca,
        state.clone(),
        mount,
        vault.refresh_interval,
    ));
    let watcher = tokio::spawn(cert.watch());
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        let _ = stop_tx.send(true);
    });
    server::serve(
        listener,
        acceptor,
        state,
        args.max_connections as usize,
        stop_rx,
    )
    .await;
    refresher.abort();
    watcher.abort();
    Ok(())
}

//! Wiring: builds the CA client, the trust bundle and the secret manager
//! from a [`Config`], binds the socket and serves until shutdown.

use std::sync::Arc;

use tokio::sync::watch;

use crate::ca::local::LocalCa;
use crate::ca::queue::CaQueue;
use crate::ca::vault::VaultCa;
use crate::ca::CaClient;
use crate::clock::Clock;
use crate::config::{CaProvider, Config};
use crate::secrets::schedule::RenewPolicy;
use crate::secrets::{ManagerOptions, SecretManager};
use crate::trust::federation::Federation;
use crate::trust::{TrustBundle, TrustOptions};

/// Builds the configured CA client, reading time from `clock`.
pub fn build_ca(config: &Config, clock: Clock) -> anyhow::Result<Arc<dyn CaClient>> {
    match &config.ca {
        CaProvider::Local { dir } => {
            tracing::warn!(
                "CA_PROVIDER=LocalCA: the in-process local CA issues any identity a connection asks for; it is for \
                 development only — set CA_PROVIDER=VaultCA for production"
            );
            let ca = LocalCa::new(dir.as_deref(), &config.trust_domain)?.with_clock(clock);
            match dir {
                Some(d) => tracing::info!(dir = %d.display(), "local CA ready (root persisted)"),
                None => tracing::info!("local CA ready (new in-memory root; set LOCAL_CA_DIR to keep it across restarts)"),
            }
            Ok(Arc::new(ca))
        }
        CaProvider::Vault(v) => {
            let ca = VaultCa::new(v.clone())?.with_clock(clock);
            tracing::info!(
                vault = %v.addr,
                auth_path = %v.auth_path,
                role = %v.role,
                sign_path = %v.sign_csr_path,
                pki_mount = %v.pki_mount,
                "Vault CA configured"
            );
            Ok(Arc::new(ca))
        }
    }
}

/// Runs the agent until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // The time every decision reads: JWT expiry, certificate validity,
    // renewals, root retention, the CA client's token cache.
    let clock = Clock::system();
    let ca = build_ca(&config, clock)?;
    let mut opts = ManagerOptions::new(
        config.trust_domain.clone(),
        config.key_type,
        config.secret_ttl,
    );
    opts.renew = RenewPolicy {
        grace_ratio: config.grace_ratio,
        jitter: config.grace_jitter,
    };
    opts.max_concurrency = config.ca_max_concurrency;
    opts.clock = clock;
    // One CA queue for every CA request: the manager's, and the trust
    // bundle's reads of the CA's roots (from its first, at start).
    let queue = CaQueue::new(config.ca_max_concurrency);
    opts.queue = Some(queue.clone());
    opts.eviction = config.eviction_period;
    opts.max_identities = config.secret_limits.max_identities;
    opts.max_jwts_per_identity = config.secret_limits.max_jwts_per_identity;
    let trust = TrustBundle::start(
        ca.clone(),
        TrustOptions {
            refresh: config.trust.refresh_interval,
            retention: config.trust.root_retention,
            extra_roots: config.trust.extra_roots.clone(),
            clock,
            queue: Some(queue),
        },
    )?;
    // Foreign trust domains' roots, beside the mesh's own (FEDERATION_CONFIG).
    let _federation = match &config.federation {
        Some(f) => {
            let to = Arc::downgrade(&trust);
            let publish: crate::trust::federation::Publish = Arc::new(move |fed| {
                if let Some(t) = to.upgrade() {
                    t.set_federated(fed)
                }
            });
            tracing::info!(
                config = %f.path.display(),
                trust_domains = %f.domains.iter().map(|d| d.trust_domain.to_string()).collect::<Vec<_>>().join(","),
                "federation: reading the bundles of the federated trust domains"
            );
            Some(Federation::start(f, clock, publish)?)
        }
        None => None,
    };
    let manager = SecretManager::new(ca.clone(), trust, opts);
    let _trimming = crate::memory::give_back_free_memory(shutdown.clone());
    let _status = crate::status::serve_agent(&config, &manager, shutdown.clone()).await?;
    let listener =
        crate::endpoint::socket::bind(&config.workload_uds_path, config.socket_dir_check)?;
    // The bounds of both sockets: the Workload API's connections and streams
    // count against the SDS caps, so the worst case stays the same.
    let limits = crate::endpoint::limits::Limits::new(config.sds.clone());
    // The surfaces beside SDS (off unless configured), from the same manager.
    let surfaces = [
        crate::workload_api::start(&config, &manager, &limits, &shutdown)?,
        crate::output::start(&config, &manager, &shutdown),
    ];
    let stopping = shutdown.clone();
    tracing::info!(
        "SDS gRPC server start, listen {:?}",
        config.workload_uds_path.display().to_string()
    );
    let result = crate::sds::serve_within(
        listener,
        manager,
        config.workload_token_path.clone(),
        limits,
        shutdown,
    )
    .await;
    // Remove the socket whatever happened, so sidecars do not dial a dead agent.
    if let Err(e) = std::fs::remove_file(&config.workload_uds_path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %config.workload_uds_path.display(), "cannot remove the SDS socket: {e}");
        }
    }
    for task in surfaces.into_iter().flatten() {
        if *stopping.borrow() {
            let _ = task.await;
        } else {
            task.abort();
        }
    }
    // Revoke the CA tokens the agent holds (best-effort, time-bounded).
    ca.shutdown().await;
    result?;
    tracing::info!("SDS server stopped");
    Ok(())
}

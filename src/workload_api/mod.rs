//! The SPIFFE Workload API (`standards/workloadapi.proto` of spiffe/spiffe)
//! on a second Unix socket, `WORKLOAD_API_SOCKET`, for workloads that speak
//! neither SDS nor read files: SPIFFE libraries (go-spiffe, py-spiffe, the
//! `spiffe` crate) and SPIRE-aware proxies.
//!
//! - `FetchX509SVID` streams the workload's X.509-SVID (DER chain, leaf
//!   first; PKCS#8 key; the trust bundle), again on every rotation and root
//!   change. `FetchX509Bundles` streams the trust bundle.
//! - Every call must carry `workload.spiffe.io: true` (a browser cannot set
//!   it), else `INVALID_ARGUMENT` with SPIRE's message.
//! - The JWT-SVID methods answer `UNIMPLEMENTED`: Vault's PKI signs X.509 only.
//! - The Workload API carries no credential and the agent attests no
//!   process, so it serves only in one-workload mode: the caller is the
//!   workload whose token is at `WORKLOAD_TOKEN_PATH`, and its SVID is that
//!   workload's certificate from the same cache as SDS. Without a token file
//!   every call gets `PERMISSION_DENIED`.
//!
//! Its bounds are the SDS server's, and shared with it (one [`Limits`] for
//! both sockets): connections (`SDS_MAX_CONNECTIONS`), streams per
//! connection and in total (`SDS_CONNECTION_MAX_STREAMS`, `SDS_MAX_STREAMS`),
//! the request's size and deadline (`SDS_MAX_REQUEST_BYTES`,
//! `SDS_FIRST_REQUEST_TIMEOUT`, read by the same [`RequestReader`]), the
//! header list, HTTP/2 keep-alive, and the connection's login budget. So the
//! agent's worst case under its caps is the same with the Workload API on.
//! Its own caps, `WORKLOAD_API_MAX_CONNECTIONS` and
//! `WORKLOAD_API_MAX_STREAMS` ([`caps`]), are taken first, so that a client
//! of the Workload API cannot take the places Envoy needs on the SDS socket.
//!
//! [`Limits`]: crate::sds::limits::Limits
//! [`RequestReader`]: crate::sds::framing::RequestReader

use std::sync::Arc;

use tokio::sync::watch;

use crate::sds::limits::Limits;
use crate::secrets::SecretManager;

mod caps;
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb;
mod server;
mod stream;
mod x509;

pub use server::{
    serve, WorkloadApiService, JWT_UNSUPPORTED, NO_ONE_WORKLOAD, SECURITY_HEADER,
    SECURITY_HEADER_MISSING,
};

/// Binds `WORKLOAD_API_SOCKET` when it is set and serves the Workload API
/// there, within `limits` (shared with the SDS server), until shutdown; then
/// removes the socket.
pub fn start(
    config: &crate::config::Config,
    manager: &Arc<SecretManager>,
    limits: &Arc<Limits>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, crate::sds::uds::SocketError> {
    let Some(path) = config.surfaces.workload_api_socket.clone() else {
        return Ok(None);
    };
    let listener = crate::sds::uds::bind_for(&path, "WORKLOAD_API_SOCKET")?;
    if config.workload_token_path.is_none() {
        tracing::warn!(
            "WORKLOAD_API_SOCKET is set without WORKLOAD_TOKEN_PATH: every Workload API call will be refused \
             with PERMISSION_DENIED, as node-wide attestation is not supported"
        );
    }
    tracing::info!(
        "SPIFFE Workload API server start, listen {:?}",
        path.display().to_string()
    );
    let service = WorkloadApiService::new(
        manager.clone(),
        config.workload_token_path.clone(),
        limits.clone(),
        caps::ApiCaps::new(&config.surfaces),
        shutdown.clone(),
    );
    let shutdown = shutdown.clone();
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = serve(listener, service, shutdown).await {
            tracing::error!(path = %path.display(), "the Workload API server failed: {e}");
        }
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), "cannot remove the Workload API socket: {e}");
            }
        }
        tracing::info!("Workload API server stopped");
    })))
}

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
//! It is served through the same endpoint as SDS ([`crate::endpoint`]), and
//! its bounds are shared with the SDS socket (one [`Limits`] for both):
//! connections (`SDS_MAX_CONNECTIONS`), streams per connection and in total
//! (`SDS_CONNECTION_MAX_STREAMS`, `SDS_MAX_STREAMS`), the request's size and
//! deadline (`SDS_MAX_REQUEST_BYTES`, `SDS_FIRST_REQUEST_TIMEOUT`, read by the
//! same [`RequestReader`]), the header list, HTTP/2 keep-alive, and the
//! connection's login budget. So the agent's worst case under its caps is
//! the same with the Workload API on. Its own caps,
//! `WORKLOAD_API_MAX_CONNECTIONS` and `WORKLOAD_API_MAX_STREAMS` ([`Caps`]),
//! are taken first, so that a client of the Workload API cannot take the
//! places Envoy needs on the SDS socket.
//!
//! [`Limits`]: crate::endpoint::limits::Limits
//! [`RequestReader`]: crate::endpoint::framing::RequestReader
//! [`Caps`]: crate::endpoint::caps::Caps

use std::sync::Arc;

use tokio::sync::watch;

use crate::endpoint::caps::Caps;
use crate::endpoint::credential::TokenFile;
use crate::endpoint::limits::Limits;
use crate::endpoint::socket::SocketError;
use crate::endpoint::Endpoint;
use crate::secrets::SecretManager;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb;
mod server;
pub mod stream;
#[cfg(test)]
mod tests;
mod x509;

pub use server::{
    WorkloadApiService, JWT_UNSUPPORTED, NO_ONE_WORKLOAD, SECURITY_HEADER, SECURITY_HEADER_MISSING,
};

/// Binds `WORKLOAD_API_SOCKET` when it is set and serves the Workload API
/// there, within `limits` (shared with the SDS server), until shutdown; then
/// removes the socket.
pub fn start(
    config: &crate::config::Config,
    manager: &Arc<SecretManager>,
    limits: &Arc<Limits>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, SocketError> {
    let Some(path) = config.surfaces.workload_api_socket.clone() else {
        return Ok(None);
    };
    let listener =
        crate::endpoint::socket::bind_for(&path, "WORKLOAD_API_SOCKET", config.socket_dir_check)?;
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
    let caps = Caps::new(
        "Workload API",
        (
            config.surfaces.workload_api_max_connections,
            "WORKLOAD_API_MAX_CONNECTIONS",
        ),
        (
            config.surfaces.workload_api_max_streams,
            "WORKLOAD_API_MAX_STREAMS",
        ),
    );
    let endpoint = Endpoint::new(limits.clone(), Some(caps), shutdown.clone());
    let service = Arc::new(WorkloadApiService {
        manager: manager.clone(),
        token_file: config.workload_token_path.clone().map(TokenFile::new),
        endpoint: endpoint.clone(),
    });
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = crate::endpoint::serve(listener, service, &endpoint).await {
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

//! Settings of the surfaces beside SDS: the SPIFFE Workload API socket
//! (`WORKLOAD_API_SOCKET`) and the certificate files (`OUTPUT_CERTS`).

use std::path::{Path, PathBuf};

use super::ConfigError;

/// Where else the workload's identity is served. Both are off when unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SurfacesConfig {
    /// `WORKLOAD_API_SOCKET`: the Unix socket of the SPIFFE Workload API.
    pub workload_api_socket: Option<PathBuf>,
    /// `OUTPUT_CERTS`: the directory the workload's `cert-chain.pem`,
    /// `key.pem` and `root-cert.pem` are written to (one-workload mode).
    pub output_certs: Option<PathBuf>,
}

pub(super) fn surfaces_from_lookup(
    get: &impl Fn(&str) -> Option<String>,
    sds_socket: &Path,
    token_path: Option<&Path>,
) -> Result<SurfacesConfig, ConfigError> {
    let workload_api_socket = get("WORKLOAD_API_SOCKET").map(PathBuf::from);
    if let Some(p) = &workload_api_socket {
        if p == sds_socket {
            return Err(ConfigError::new(
                "WORKLOAD_API_SOCKET",
                p.display().to_string(),
                "is the SDS socket (WORKLOAD_UDS_PATH); the Workload API needs a socket of its own",
            ));
        }
    }
    let output_certs = get("OUTPUT_CERTS").map(PathBuf::from);
    if let Some(dir) = &output_certs {
        if token_path.is_none() {
            return Err(ConfigError::new(
                "OUTPUT_CERTS",
                dir.display().to_string(),
                "certificate files hold one workload's identity: set WORKLOAD_TOKEN_PATH \
                 (one-workload mode) to the token of the workload they are for",
            ));
        }
    }
    Ok(SurfacesConfig {
        workload_api_socket,
        output_certs,
    })
}

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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use crate::config::Config;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, crate::config::ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned(), None)
    }

    #[test]
    fn off_unless_set_and_checked_against_the_other_settings() {
        let local = ("CA_PROVIDER", "LocalCA");
        let c = cfg(&[local]).unwrap();
        assert_eq!(c.surfaces.workload_api_socket, None);
        assert_eq!(c.surfaces.output_certs, None);

        // The Workload API without a token file is allowed (and refuses calls).
        let c = cfg(&[local, ("WORKLOAD_API_SOCKET", "/run/spire/api.sock")]).unwrap();
        assert_eq!(
            c.surfaces.workload_api_socket,
            Some(PathBuf::from("/run/spire/api.sock"))
        );
        let e = cfg(&[
            local,
            ("WORKLOAD_UDS_PATH", "/run/sds"),
            ("WORKLOAD_API_SOCKET", "/run/sds"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "WORKLOAD_API_SOCKET");

        // Files need one-workload mode.
        let e = cfg(&[local, ("OUTPUT_CERTS", "/etc/certs")]).unwrap_err();
        assert_eq!(e.var, "OUTPUT_CERTS");
        assert!(e.to_string().contains("WORKLOAD_TOKEN_PATH"), "{e}");
        let c = cfg(&[
            local,
            ("OUTPUT_CERTS", "/etc/certs"),
            ("WORKLOAD_TOKEN_PATH", "/var/run/secrets/token"),
        ])
        .unwrap();
        assert_eq!(c.surfaces.output_certs, Some(PathBuf::from("/etc/certs")));
    }
}

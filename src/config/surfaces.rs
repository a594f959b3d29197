//! Settings of the surfaces beside SDS: the SPIFFE Workload API socket
//! (`WORKLOAD_API_SOCKET`) and its own caps (`WORKLOAD_API_MAX_*`), and the
//! certificate files (`OUTPUT_CERTS`).

use std::path::{Path, PathBuf};

use super::ConfigError;

/// Where else the workload's identity is served. Both are off when unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurfacesConfig {
    /// `WORKLOAD_API_SOCKET`: the Unix socket of the SPIFFE Workload API.
    pub workload_api_socket: Option<PathBuf>,
    /// `WORKLOAD_API_MAX_CONNECTIONS`: open connections on the Workload API
    /// socket; past it a new one is closed at once. They also count under
    /// `SDS_MAX_CONNECTIONS`, which both sockets share: this cap keeps the
    /// Workload API from taking the SDS socket's connections.
    pub workload_api_max_connections: usize,
    /// `WORKLOAD_API_MAX_STREAMS`: open Workload API streams (each holds the
    /// workload's subscription); past it a new one is `RESOURCE_EXHAUSTED`.
    /// They also count under `SDS_MAX_STREAMS`.
    pub workload_api_max_streams: usize,
    /// `OUTPUT_CERTS`: the directory the workload's `cert-chain.pem`,
    /// `key.pem` and `root-cert.pem` are written to (one-workload mode).
    pub output_certs: Option<PathBuf>,
}

impl Default for SurfacesConfig {
    fn default() -> Self {
        Self {
            workload_api_socket: None,
            // One workload's processes: a SPIFFE library opens one
            // connection with one or two streams.
            workload_api_max_connections: 32,
            workload_api_max_streams: 64,
            output_certs: None,
        }
    }
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
    let d = SurfacesConfig::default();
    let count = |var: &'static str, default: usize| match get(var) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=1 << 20).contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                var,
                v,
                format!("must be a whole number from 1 to {}", 1 << 20),
            )),
        },
    };
    let workload_api_max_connections = count(
        "WORKLOAD_API_MAX_CONNECTIONS",
        d.workload_api_max_connections,
    )?;
    let workload_api_max_streams = count("WORKLOAD_API_MAX_STREAMS", d.workload_api_max_streams)?;
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
        workload_api_max_connections,
        workload_api_max_streams,
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

    #[test]
    fn workload_api_caps_have_defaults_and_are_checked() {
        let local = ("CA_PROVIDER", "LocalCA");
        let c = cfg(&[local]).unwrap();
        assert_eq!(
            (
                c.surfaces.workload_api_max_connections,
                c.surfaces.workload_api_max_streams
            ),
            (32, 64)
        );
        let c = cfg(&[
            local,
            ("WORKLOAD_API_MAX_CONNECTIONS", "2"),
            ("WORKLOAD_API_MAX_STREAMS", "3"),
        ])
        .unwrap();
        assert_eq!(
            (
                c.surfaces.workload_api_max_connections,
                c.surfaces.workload_api_max_streams
            ),
            (2, 3)
        );
        for var in ["WORKLOAD_API_MAX_CONNECTIONS", "WORKLOAD_API_MAX_STREAMS"] {
            for bad in ["0", "many", "-1"] {
                let e = cfg(&[local, (var, bad)]).unwrap_err();
                assert_eq!(e.var, var);
                assert!(e.to_string().contains("whole number"), "{e}");
            }
        }
    }
}

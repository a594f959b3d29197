//! Settings, read once at start from the environment (Istio 1.1's names) and
//! the command line, and checked there: every invalid setting stops the agent
//! with a message naming the variable and the value.

use std::path::PathBuf;
use std::time::Duration;

use crate::crypto::KeyType;
use crate::duration::parse_go_duration;

/// Default SDS socket, as Istio 1.1's Node Agent used.
pub const DEFAULT_UDS_PATH: &str = "/var/run/sds/uds_path";
/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default requested certificate lifetime.
pub const DEFAULT_SECRET_TTL: Duration = Duration::from_secs(24 * 3600);

/// A setting that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid setting {var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    fn new(var: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            var,
            value: value.into(),
            reason: reason.into(),
        }
    }
}

mod debug_from;
mod limits;
pub mod observe;
pub use debug_from::DebugFrom;
mod surfaces;
mod vault;
use limits::limits_from_lookup;
pub use limits::{PeerMode, SdsLimits};
pub use observe::ObserveConfig;
use surfaces::surfaces_from_lookup;
pub use surfaces::SurfacesConfig;
use vault::vault_from_lookup;
pub use vault::VaultConfig;
mod federation;
mod trust;
pub use federation::{BundleSource, FederatedDomain, FederationConfig, DEFAULT_FEDERATION_REFRESH};
pub use trust::TrustConfig;
mod secrets;
pub use secrets::SecretLimits;

/// Which CA signs workload certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaProvider {
    /// In-process CA, for development and tests.
    Local { dir: Option<PathBuf> },
    /// HashiCorp Vault / OpenBao PKI, logged in to with the workload's JWT.
    Vault(VaultConfig),
}

/// `SOCKET_DIR_CHECK`: whether the sockets' directory must be the agent's
/// alone ([`crate::endpoint::socket`] says why).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SocketDirCheck {
    /// `strict`: owned by the agent's uid or root, and writable by no one
    /// else; otherwise the agent does not start.
    #[default]
    Strict,
    /// `pod`: not checked. For a volume only the pod's own containers mount:
    /// kubelet makes every emptyDir world-writable (0777).
    Pod,
}

/// The accepted values of `CA_PROVIDER`, for error messages and docs.
pub const CA_PROVIDERS: &[&str] = &["VaultCA", "LocalCA"];

/// Everything the agent needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub workload_uds_path: PathBuf,
    /// `SOCKET_DIR_CHECK`: for the directories of `WORKLOAD_UDS_PATH` and
    /// `WORKLOAD_API_SOCKET`.
    pub socket_dir_check: SocketDirCheck,
    pub trust_domain: String,
    pub key_type: KeyType,
    pub secret_ttl: Duration,
    pub ca: CaProvider,
    /// One-workload-per-agent mode: read the workload's JWT from this file when
    /// a connection carries no credential.
    pub workload_token_path: Option<PathBuf>,
    /// `SECRET_GRACE_PERIOD_RATIO`: renew when this fraction of the lifetime is left.
    pub grace_ratio: f64,
    /// `SECRET_GRACE_PERIOD_RATIO_JITTER`: ± random spread of the ratio.
    pub grace_jitter: f64,
    /// `CA_MAX_CONCURRENCY`: most CA requests in flight.
    pub ca_max_concurrency: usize,
    /// `SECRET_EVICTION_PERIOD`: how long an unwatched identity stays cached.
    pub eviction_period: Duration,
    /// Status server and logs (`STATUS_ADDR`, `LOG_FORMAT`, `LOG_LEVEL`).
    pub observe: ObserveConfig,
    /// Where `ROOTCA` comes from (`TRUST_*`).
    pub trust: TrustConfig,
    /// `FEDERATION_*`: foreign trust domains and their bundles' sources.
    pub federation: Option<FederationConfig>,
    /// `MAX_IDENTITIES`, `MAX_JWTS_PER_IDENTITY`.
    pub secret_limits: SecretLimits,
    /// `SDS_*`: the SDS server's bounds (connections, streams, sizes, logins).
    pub sds: SdsLimits,
    /// The Workload API socket and the certificate files.
    pub surfaces: SurfacesConfig,
}

impl Config {
    /// Builds the configuration from the process environment plus an explicit
    /// socket path from the command line (which wins over `WORKLOAD_UDS_PATH`).
    pub fn from_env(uds_path_flag: Option<PathBuf>) -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok(), uds_path_flag)
    }

    /// Builds the configuration from any variable lookup (tests pass a map).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        uds_path_flag: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        // Unset and empty mean the same, as they did for Istio.
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());

        let workload_uds_path = match uds_path_flag {
            Some(p) => p,
            None => get("WORKLOAD_UDS_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_UDS_PATH)),
        };
        if workload_uds_path.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "WORKLOAD_UDS_PATH",
                "",
                "must not be empty",
            ));
        }

        let socket_dir_check = match get("SOCKET_DIR_CHECK").as_deref().map(str::trim) {
            None | Some("strict") => SocketDirCheck::Strict,
            Some("pod") => SocketDirCheck::Pod,
            Some(v) => return Err(ConfigError::new(
                "SOCKET_DIR_CHECK",
                v,
                "must be strict (the directory is the agent's alone) or pod (a volume only this \
                     pod's containers mount)",
            )),
        };

        let (td_var, trust_domain) = match get("TRUST_DOMAIN") {
            Some(v) => ("TRUST_DOMAIN", v),
            None => match get("Trust_Domain") {
                Some(v) => ("Trust_Domain", v),
                None => ("TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN.to_string()),
            },
        };
        validate_trust_domain(&trust_domain)
            .map_err(|r| ConfigError::new(td_var, &trust_domain, r))?;

        let key_type = match get("KEY_TYPE") {
            Some(v) => v
                .parse::<KeyType>()
                .map_err(|e| ConfigError::new("KEY_TYPE", &v, e))?,
            None => KeyType::EcP256,
        };

        let secret_ttl = match get("SECRET_TTL") {
            Some(v) => {
                let d = parse_go_duration(&v)
                    .map_err(|e| ConfigError::new("SECRET_TTL", &v, e.to_string()))?;
                if d < Duration::from_secs(1) {
                    return Err(ConfigError::new("SECRET_TTL", &v, "must be at least 1s"));
                }
                d
            }
            None => DEFAULT_SECRET_TTL,
        };

        let workload_token_path = get("WORKLOAD_TOKEN_PATH").map(PathBuf::from);

        let ratio =
            |var: &'static str, default: f64, lo: f64, hi: f64| -> Result<f64, ConfigError> {
                match get(var) {
                    None => Ok(default),
                    Some(v) => match v.trim().parse::<f64>() {
                        Ok(r) if r > lo && r < hi || (lo == 0.0 && r == 0.0 && hi < 1.0) => Ok(r),
                        _ => Err(ConfigError::new(
                            var,
                            v,
                            format!("must be a number greater than {lo} and less than {hi}"),
                        )),
                    },
                }
            };
        let grace_ratio = ratio("SECRET_GRACE_PERIOD_RATIO", 0.5, 0.0, 1.0)?;
        let grace_jitter = ratio("SECRET_GRACE_PERIOD_RATIO_JITTER", 0.01, 0.0, 0.5)?;
        let ca_max_concurrency = match get("CA_MAX_CONCURRENCY") {
            None => 16,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => n,
                _ => {
                    return Err(ConfigError::new(
                        "CA_MAX_CONCURRENCY",
                        v,
                        "must be a whole number from 1 to 1024",
                    ))
                }
            },
        };
        let eviction_period = match get("SECRET_EVICTION_PERIOD") {
            None => Duration::from_secs(3600),
            Some(v) => match parse_go_duration(&v) {
                Ok(d) if d >= Duration::from_secs(1) => d,
                Ok(_) => {
                    return Err(ConfigError::new(
                        "SECRET_EVICTION_PERIOD",
                        v,
                        "must be at least 1s",
                    ))
                }
                Err(e) => return Err(ConfigError::new("SECRET_EVICTION_PERIOD", v, e.to_string())),
            },
        };

        let ca = Self::ca_from_lookup(&get)?;
        let observe = observe::observe_from_lookup(&lookup)?;
        let trust = trust::trust_from_lookup(&get)?;
        let federation = federation::federation_from_lookup(&get, &trust_domain)?;
        let secret_limits = secrets::secret_limits_from_lookup(&get)?;
        let sds = limits_from_lookup(&get)?;
        let surfaces =
            surfaces_from_lookup(&get, &workload_uds_path, workload_token_path.as_deref())?;

        Ok(Self {
            workload_uds_path,
            socket_dir_check,
            trust_domain,
            key_type,
            secret_ttl,
            ca,
            workload_token_path,
            grace_ratio,
            grace_jitter,
            ca_max_concurrency,
            eviction_period,
            observe,
            trust,
            federation,
            secret_limits,
            sds,
            surfaces,
        })
    }

    /// The CA, which must be chosen explicitly: a forgotten variable must not
    /// start the local CA, which issues any identity to anyone.
    fn ca_from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<CaProvider, ConfigError> {
        let local = || CaProvider::Local {
            dir: get("LOCAL_CA_DIR").map(PathBuf::from),
        };
        let Some(provider) = get("CA_PROVIDER") else {
            for var in ["CA_ADDR", "VAULT_ADDR"] {
                if let Some(v) = get(var) {
                    return Err(ConfigError::new(
                        var,
                        v,
                        format!(
                            "a CA address is set but CA_PROVIDER is not; set CA_PROVIDER to one of {}",
                            CA_PROVIDERS.join(", ")
                        ),
                    ));
                }
            }
            return Err(ConfigError::new("CA_PROVIDER", "", NO_CA_CHOSEN));
        };
        match provider.trim() {
            p if p.eq_ignore_ascii_case("LocalCA") => Ok(local()),
            p if p.eq_ignore_ascii_case("VaultCA") => {
                Ok(CaProvider::Vault(vault_from_lookup(get)?))
            }
            _ => Err(ConfigError::new(
                "CA_PROVIDER",
                provider.clone(),
                format!(
                    "unsupported CA provider; accepted values are {}",
                    CA_PROVIDERS.join(", ")
                ),
            )),
        }
    }
}

/// Why the agent will not start without a CA.
pub const NO_CA_CHOSEN: &str =
    "no CA configured; choose one: CA_PROVIDER=VaultCA with VAULT_ADDR, \
     VAULT_AUTH_PATH, VAULT_ROLE and VAULT_SIGN_CSR_PATH (production), or CA_PROVIDER=LocalCA for \
     development only (it issues any identity to any caller)";

/// A boolean setting: `true` or `false` (also `1`/`0`, any case).
pub fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err("must be true or false".into()),
    }
}

/// Checks a SPIFFE trust domain (`TRUST_DOMAIN`, and `vault-setup --trust-domain`).
pub fn validate_trust_domain(td: &str) -> Result<(), String> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err("a SPIFFE trust domain has only lowercase letters, digits, '.', '-' and '_'".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned(), None)
    }

    #[test]
    fn defaults() {
        let c = cfg(&[("CA_PROVIDER", "LocalCA")]).unwrap();
        assert_eq!(c.workload_uds_path, PathBuf::from(DEFAULT_UDS_PATH));
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.key_type, KeyType::EcP256);
        assert_eq!(c.secret_ttl, DEFAULT_SECRET_TTL);
        assert_eq!(c.ca, CaProvider::Local { dir: None });
        assert_eq!(c.socket_dir_check, SocketDirCheck::Strict);
    }

    #[test]
    fn socket_dir_check() {
        let with = |v| cfg(&[("CA_PROVIDER", "LocalCA"), ("SOCKET_DIR_CHECK", v)]);
        assert_eq!(with("pod").unwrap().socket_dir_check, SocketDirCheck::Pod);
        assert_eq!(
            with("strict").unwrap().socket_dir_check,
            SocketDirCheck::Strict
        );
        let e = with("off").unwrap_err();
        assert_eq!(e.var, "SOCKET_DIR_CHECK");
        assert!(e.to_string().contains("strict"), "{e}");
    }

    #[test]
    fn no_ca_chosen_is_an_error_naming_both_choices() {
        let e = cfg(&[]).unwrap_err();
        assert_eq!(e.var, "CA_PROVIDER");
        let m = e.to_string();
        assert!(
            m.contains("CA_PROVIDER=VaultCA") && m.contains("CA_PROVIDER=LocalCA"),
            "{m}"
        );
        // Other settings alone do not choose one either.
        assert_eq!(
            cfg(&[("LOCAL_CA_DIR", "/tmp/ca")]).unwrap_err().var,
            "CA_PROVIDER"
        );
    }

    #[test]
    fn istio_trust_domain_spelling() {
        assert_eq!(
            cfg(&[("Trust_Domain", "example.org"), ("CA_PROVIDER", "LocalCA")])
                .unwrap()
                .trust_domain,
            "example.org"
        );
        let e = cfg(&[("TRUST_DOMAIN", "Bad Domain")]).unwrap_err();
        assert_eq!(e.var, "TRUST_DOMAIN");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = cfg(&[("CA_PROVIDER", "GoogleCA")]).unwrap_err();
        assert_eq!(e.var, "CA_PROVIDER");
        assert!(e.to_string().contains("VaultCA, LocalCA"), "{e}");
        assert_eq!(
            cfg(&[("SECRET_TTL", "1 day")]).unwrap_err().var,
            "SECRET_TTL"
        );
        assert_eq!(cfg(&[("KEY_TYPE", "dsa")]).unwrap_err().var, "KEY_TYPE");
        assert_eq!(
            cfg(&[("CA_ADDR", "https://v:8200")]).unwrap_err().var,
            "CA_ADDR"
        );
        for (var, bad) in [
            ("SECRET_GRACE_PERIOD_RATIO", "1.0"),
            ("SECRET_GRACE_PERIOD_RATIO", "0"),
            ("SECRET_GRACE_PERIOD_RATIO", "half"),
            ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0.7"),
            ("CA_MAX_CONCURRENCY", "0"),
            ("SECRET_EVICTION_PERIOD", "forever"),
        ] {
            assert_eq!(cfg(&[(var, bad)]).unwrap_err().var, var, "{var}={bad}");
        }
        let c = cfg(&[
            ("CA_PROVIDER", "LocalCA"),
            ("SECRET_GRACE_PERIOD_RATIO", "0.25"),
            ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
        ])
        .unwrap();
        assert_eq!((c.grace_ratio, c.grace_jitter), (0.25, 0.0));
    }

    #[test]
    fn vault_settings() {
        let base = [
            ("CA_PROVIDER", "VaultCA"),
            ("CA_ADDR", "https://vault:8200/"),
            ("VAULT_AUTH_PATH", "auth/kubernetes/login"),
            ("VAULT_ROLE", "istio-cert"),
            ("VAULT_SIGN_CSR_PATH", "/v1/istio_ca/sign/istio-pki-role"),
        ];
        let c = cfg(&base).unwrap();
        let CaProvider::Vault(v) = c.ca else {
            panic!("not vault")
        };
        assert_eq!(v.addr, "https://vault:8200");
        assert_eq!(v.sign_csr_path, "istio_ca/sign/istio-pki-role");
        assert_eq!(v.pki_mount, "istio_ca", "from the sign path");
        let mut own_mount = base.to_vec();
        own_mount.push(("VAULT_PKI_MOUNT", "/v1/team/pki/"));
        let CaProvider::Vault(v) = cfg(&own_mount).unwrap().ca else {
            panic!("not vault")
        };
        assert_eq!(v.pki_mount, "team/pki");
        for bad_mount in ["../sys", "pki?x", "a//b"] {
            let mut bad = base.to_vec();
            bad.push(("VAULT_PKI_MOUNT", bad_mount));
            assert_eq!(cfg(&bad).unwrap_err().var, "VAULT_PKI_MOUNT", "{bad_mount}");
        }
        let mut verbatim = base.to_vec();
        verbatim.retain(|(k, _)| *k != "VAULT_SIGN_CSR_PATH");
        verbatim.push(("VAULT_SIGN_CSR_PATH", "pki/sign-verbatim/role"));
        let e = cfg(&verbatim).unwrap_err();
        assert_eq!(e.var, "VAULT_SIGN_CSR_PATH");
        assert!(e.to_string().contains("VAULT_PKI_MOUNT"), "{e}");
        verbatim.push(("VAULT_PKI_MOUNT", "pki"));
        assert!(cfg(&verbatim).is_ok());
        for missing in [
            "VAULT_AUTH_PATH",
            "VAULT_ROLE",
            "VAULT_SIGN_CSR_PATH",
            "CA_ADDR",
        ] {
            let vars: Vec<_> = base
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let e = cfg(&vars).unwrap_err();
            let expect = if missing == "CA_ADDR" {
                "VAULT_ADDR"
            } else {
                missing
            };
            assert_eq!(e.var, expect);
        }
        let mut bad = base.to_vec();
        bad.push(("VAULT_ADDR", "vault:8200"));
        assert_eq!(cfg(&bad).unwrap_err().var, "VAULT_ADDR");
        let mut bad = base.to_vec();
        bad.push(("VAULT_TLS_ROOT_CERT", "/nonexistent/ca.pem"));
        assert_eq!(cfg(&bad).unwrap_err().var, "VAULT_TLS_ROOT_CERT");
        let mut bad = base.to_vec();
        bad.push(("VAULT_REQUEST_TIMEOUT", "soon"));
        assert_eq!(cfg(&bad).unwrap_err().var, "VAULT_REQUEST_TIMEOUT");
    }
}

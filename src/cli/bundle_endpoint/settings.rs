//! The settings of `bundle-endpoint`: its own (flags, each with an
//! environment variable) and the agent's Vault settings, parsed by the
//! agent's own code ([`Config`]) so that both read Vault the same way.

use std::time::Duration;

use crate::config::{CaProvider, Config, ConfigError, VaultConfig};

/// The agent's variables `bundle-endpoint` uses: how to reach Vault, which
/// PKI mount, and how often to read it. Every other variable of the
/// environment is ignored, so that an agent setting it does not use cannot
/// stop it.
pub const USED_AGENT_VARS: &[&str] = &[
    "VAULT_ADDR",
    "CA_ADDR",
    "VAULT_PKI_MOUNT",
    "VAULT_SIGN_CSR_PATH",
    "VAULT_TLS_ROOT_CERT",
    "VAULT_TLS_SYSTEM_ROOTS",
    "VAULT_NAMESPACE",
    "VAULT_CONNECT_TIMEOUT",
    "VAULT_REQUEST_TIMEOUT",
    "TRUST_REFRESH_INTERVAL",
];

/// Stands for the agent's login settings, which the Vault settings require
/// but `bundle-endpoint` never uses: it reads the mount's issuers, which
/// need no login.
const UNUSED: &str = "unused-by-bundle-endpoint";

/// What `bundle-endpoint` takes from the agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSettings {
    pub vault: VaultConfig,
    /// `TRUST_REFRESH_INTERVAL`: how often the mount's roots are read.
    pub refresh_interval: Duration,
}

/// Reads the Vault settings from `lookup` (the environment, or a map in
/// tests). Unset and empty are the same, as for the agent.
pub fn vault_settings(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<VaultSettings, ConfigError> {
    let get = |k: &str| {
        USED_AGENT_VARS
            .contains(&k)
            .then(|| lookup(k))
            .flatten()
            .filter(|v| !v.trim().is_empty())
    };
    if get("VAULT_ADDR").is_none() && get("CA_ADDR").is_none() {
        return Err(ConfigError {
            var: "VAULT_ADDR",
            value: String::new(),
            reason: "required: the Vault/OpenBao whose PKI mount's roots are served, \
                     e.g. https://vault:8200"
                .into(),
        });
    }
    let has_mount = get("VAULT_PKI_MOUNT").is_some();
    if !has_mount && get("VAULT_SIGN_CSR_PATH").is_none() {
        return Err(ConfigError {
            var: "VAULT_PKI_MOUNT",
            value: String::new(),
            reason: "required (or VAULT_SIGN_CSR_PATH, whose part before /sign/ is the mount): \
                     the PKI mount whose roots are served, e.g. istio_ca"
                .into(),
        });
    }
    let overlay = |k: &str| match k {
        "CA_PROVIDER" => Some("VaultCA".to_string()),
        "VAULT_AUTH_PATH" => Some(format!("auth/{UNUSED}/login")),
        "VAULT_ROLE" => Some(UNUSED.to_string()),
        // With VAULT_PKI_MOUNT the sign path names no mount; it is required
        // by the agent's parsing only.
        "VAULT_SIGN_CSR_PATH" if has_mount && get(k).is_none() => {
            Some(format!("{UNUSED}/sign/{UNUSED}"))
        }
        _ => get(k),
    };
    let config = Config::from_lookup(overlay, None)?;
    let CaProvider::Vault(vault) = config.ca else {
        unreachable!("CA_PROVIDER is VaultCA");
    };
    Ok(VaultSettings {
        vault,
        refresh_interval: config.trust.refresh_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<VaultSettings, ConfigError> {
        vault_settings(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_mount_comes_from_either_setting() {
        let addr = ("VAULT_ADDR", "https://vault:8200");
        let s = read(&[
            addr,
            ("VAULT_SIGN_CSR_PATH", "istio_ca/sign/istio-pki-role"),
        ])
        .unwrap();
        assert_eq!(s.vault.pki_mount, "istio_ca");
        assert_eq!(s.vault.addr, "https://vault:8200");
        assert_eq!(s.refresh_interval, Duration::from_secs(300));
        let s = read(&[
            addr,
            ("VAULT_PKI_MOUNT", "team/pki"),
            ("TRUST_REFRESH_INTERVAL", "30s"),
        ])
        .unwrap();
        assert_eq!(s.vault.pki_mount, "team/pki");
        assert_eq!(s.refresh_interval, Duration::from_secs(30));
    }

    #[test]
    fn missing_or_bad_settings_name_the_variable() {
        let e = read(&[("VAULT_PKI_MOUNT", "istio_ca")]).unwrap_err();
        assert_eq!(e.var, "VAULT_ADDR", "{e}");
        let e = read(&[("VAULT_ADDR", "https://vault:8200")]).unwrap_err();
        assert_eq!(e.var, "VAULT_PKI_MOUNT", "{e}");
        let e = read(&[
            ("VAULT_ADDR", "vault:8200"),
            ("VAULT_PKI_MOUNT", "istio_ca"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "VAULT_ADDR", "{e}");
        let e = read(&[
            ("VAULT_ADDR", "https://vault:8200"),
            ("VAULT_PKI_MOUNT", "../sys"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "VAULT_PKI_MOUNT", "{e}");
    }

    #[test]
    fn agent_settings_it_does_not_use_are_ignored() {
        let s = read(&[
            ("VAULT_ADDR", "https://vault:8200"),
            ("VAULT_PKI_MOUNT", "istio_ca"),
            ("CA_PROVIDER", "LocalCA"),
            ("SECRET_TTL", "not a duration"),
            ("WORKLOAD_UDS_PATH", ""),
        ]);
        assert!(s.is_ok(), "{s:?}");
    }
}

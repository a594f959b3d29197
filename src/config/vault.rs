//! The Vault settings (`CA_PROVIDER=VaultCA`): Istio 1.1's variables plus
//! TLS, namespace and time-outs.

use std::time::Duration;

use super::ConfigError;
use crate::duration::parse_go_duration;

/// How to reach and use Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    /// Base URL, e.g. `https://vault:8200` (no trailing slash).
    pub addr: String,
    /// Login path under `/v1/`, e.g. `auth/kubernetes/login`.
    pub auth_path: String,
    /// Role sent with the login.
    pub role: String,
    /// Sign path under `/v1/`, e.g. `istio_ca/sign/istio-pki-role`.
    pub sign_csr_path: String,
    /// The PKI mount whose issuers are the trusted roots, e.g. `istio_ca`
    /// (`VAULT_PKI_MOUNT`, else the sign path before `/sign/`).
    pub pki_mount: String,
    /// The CA(s) trusted for Vault's TLS certificate, PEM
    /// (`VAULT_TLS_ROOT_CERT`): when set, instead of the system roots.
    pub tls_root_pem: Option<String>,
    /// Trust the system roots for Vault's TLS too (`VAULT_TLS_SYSTEM_ROOTS`;
    /// true by default only without `tls_root_pem`).
    pub tls_system_roots: bool,
    /// Sent as `X-Vault-Namespace` when set.
    pub namespace: Option<String>,
    /// Time-out for establishing a connection to Vault.
    pub connect_timeout: Duration,
    /// Time-out for one whole Vault request.
    pub request_timeout: Duration,
}

pub(super) fn vault_from_lookup(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<VaultConfig, ConfigError> {
    let required = |var: &'static str, example: &str| {
        get(var).ok_or_else(|| {
            ConfigError::new(
                var,
                "",
                format!("required with CA_PROVIDER=VaultCA, e.g. {example}"),
            )
        })
    };
    let (addr_var, addr) = match get("VAULT_ADDR") {
        Some(v) => ("VAULT_ADDR", v),
        None => match get("CA_ADDR") {
            Some(v) => ("CA_ADDR", v),
            None => {
                return Err(ConfigError::new(
                    "VAULT_ADDR",
                    "",
                    "required with CA_PROVIDER=VaultCA (or CA_ADDR), e.g. https://vault:8200",
                ))
            }
        },
    };
    let addr = validate_vault_addr(&addr).map_err(|r| ConfigError::new(addr_var, &addr, r))?;
    let path = |var: &'static str, example: &str| -> Result<String, ConfigError> {
        let v = required(var, example)?;
        let p = v.trim().trim_matches('/').to_string();
        let p = p.strip_prefix("v1/").unwrap_or(&p).to_string();
        if p.is_empty() || p.contains(char::is_whitespace) || p.contains('?') || p.contains('#') {
            return Err(ConfigError::new(
                var,
                v,
                format!("must be a Vault API path such as {example}"),
            ));
        }
        Ok(p)
    };
    let auth_path = path("VAULT_AUTH_PATH", "auth/kubernetes/login")?;
    let sign_csr_path = path("VAULT_SIGN_CSR_PATH", "istio_ca/sign/istio-pki-role")?;
    let role = required("VAULT_ROLE", "istio-cert")?;
    let pki_mount = match get("VAULT_PKI_MOUNT") {
        Some(v) => {
            let m = v.trim().trim_matches('/');
            let m = m.strip_prefix("v1/").unwrap_or(m);
            if m.is_empty() || !m.split('/').all(valid_path_segment) {
                return Err(ConfigError::new(
                    "VAULT_PKI_MOUNT",
                    v,
                    "must be the path of a PKI mount, e.g. istio_ca",
                ));
            }
            m.to_string()
        }
        None => mount_of_sign_path(&sign_csr_path).ok_or_else(|| {
            ConfigError::new(
                "VAULT_SIGN_CSR_PATH",
                &sign_csr_path,
                "the PKI mount cannot be told from this path (it has no /sign/); set VAULT_PKI_MOUNT",
            )
        })?,
    };
    let tls_root_pem = match get("VAULT_TLS_ROOT_CERT") {
        None => None,
        Some(v) => Some(
            load_pem_setting(&v)
                .map_err(|r| ConfigError::new("VAULT_TLS_ROOT_CERT", abbreviate(&v), r))?,
        ),
    };
    let tls_system_roots = match get("VAULT_TLS_SYSTEM_ROOTS") {
        None => tls_root_pem.is_none(),
        Some(v) => match super::parse_bool(&v) {
            Ok(false) if tls_root_pem.is_none() => {
                return Err(ConfigError::new(
                    "VAULT_TLS_SYSTEM_ROOTS",
                    v,
                    "false without VAULT_TLS_ROOT_CERT would trust no CA for Vault's TLS; \
                     set VAULT_TLS_ROOT_CERT to Vault's CA",
                ))
            }
            Ok(b) => b,
            Err(r) => return Err(ConfigError::new("VAULT_TLS_SYSTEM_ROOTS", v, r)),
        },
    };
    let timeout = |var: &'static str, default: Duration| -> Result<Duration, ConfigError> {
        match get(var) {
            None => Ok(default),
            Some(v) => match parse_go_duration(&v) {
                Ok(d) if d >= Duration::from_millis(10) => Ok(d),
                Ok(_) => Err(ConfigError::new(var, v, "must be at least 10ms")),
                Err(e) => Err(ConfigError::new(var, v, e.to_string())),
            },
        }
    };
    Ok(VaultConfig {
        addr,
        auth_path,
        role: role.trim().to_string(),
        sign_csr_path,
        pki_mount,
        tls_root_pem,
        tls_system_roots,
        namespace: get("VAULT_NAMESPACE").map(|v| v.trim().to_string()),
        connect_timeout: timeout("VAULT_CONNECT_TIMEOUT", Duration::from_secs(5))?,
        request_timeout: timeout("VAULT_REQUEST_TIMEOUT", Duration::from_secs(15))?,
    })
}

/// `VAULT_PKI_MOUNT` unless set: the part of `VAULT_SIGN_CSR_PATH` before
/// `/sign/` (and before `/issuer/<ref>` when the path names an issuer).
pub(super) fn mount_of_sign_path(sign_path: &str) -> Option<String> {
    let (before, _) = sign_path.split_once("/sign/")?;
    let mount = match before.rsplit_once("/issuer/") {
        Some((m, issuer)) if !issuer.contains('/') => m,
        _ => before,
    };
    (!mount.is_empty()).then(|| mount.to_string())
}

/// A path segment of a mount: letters, digits, `-`, `_`, `.` (not `..`).
fn valid_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != ".."
        && s != "."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Shortens a long value (a PEM body) for an error message.
fn abbreviate(v: &str) -> String {
    if v.len() > 60 {
        format!(
            "{}...",
            &v[..v.char_indices().nth(57).map(|(i, _)| i).unwrap_or(v.len())]
        )
    } else {
        v.to_string()
    }
}

/// `VAULT_TLS_ROOT_CERT` is PEM text (as Istio took it) or a path to a PEM file.
fn load_pem_setting(v: &str) -> Result<String, String> {
    let text = if v.contains("-----BEGIN") {
        v.to_string()
    } else {
        std::fs::read_to_string(v.trim())
            .map_err(|e| format!("neither PEM text nor a readable PEM file: {e}"))?
    };
    let mut count = 0;
    for pem in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let pem = pem.map_err(|e| format!("malformed PEM: {e}"))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!(
                "expected CERTIFICATE blocks, found {:?}",
                pem.label
            ));
        }
        pem.parse_x509()
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("contains no PEM certificate".into());
    }
    Ok(text)
}

fn validate_vault_addr(v: &str) -> Result<String, String> {
    let v = v.trim().trim_end_matches('/');
    let rest = v
        .strip_prefix("https://")
        .or_else(|| v.strip_prefix("http://"))
        .ok_or("must start with https:// or http://")?;
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err("has no host".into());
    }
    reqwest::Url::parse(v).map_err(|e| format!("not a valid URL: {e}"))?;
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_comes_from_the_sign_path() {
        assert_eq!(
            mount_of_sign_path("istio_ca/sign/istio-pki-role").as_deref(),
            Some("istio_ca")
        );
        assert_eq!(
            mount_of_sign_path("team/pki/issuer/default/sign/role").as_deref(),
            Some("team/pki")
        );
        assert_eq!(mount_of_sign_path("pki/sign-verbatim/role"), None);
        assert_eq!(mount_of_sign_path("/sign/role"), None);
    }

    #[test]
    fn a_root_cert_replaces_the_system_roots_unless_they_are_added_back() {
        let ca = rcgen::generate_simple_self_signed(vec!["vault".to_string()]).unwrap();
        let pem = ca.cert.pem();
        let lookup = |extra: &[(&'static str, &str)]| {
            let vars: Vec<(&str, String)> = [
                ("VAULT_ADDR", "https://vault:8200"),
                ("VAULT_AUTH_PATH", "auth/kubernetes/login"),
                ("VAULT_ROLE", "istio-cert"),
                ("VAULT_SIGN_CSR_PATH", "istio_ca/sign/istio-pki-role"),
            ]
            .iter()
            .chain(extra)
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
            vault_from_lookup(&|k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
        };
        let system = |extra: &[(&'static str, &str)]| lookup(extra).map(|c| c.tls_system_roots);
        let root = ("VAULT_TLS_ROOT_CERT", pem.as_str());
        assert_eq!(system(&[]), Ok(true), "no CA given: the system roots");
        assert_eq!(system(&[root]), Ok(false), "a CA given replaces them");
        for yes in ["true", "TRUE", "1"] {
            assert_eq!(system(&[root, ("VAULT_TLS_SYSTEM_ROOTS", yes)]), Ok(true));
        }
        assert_eq!(
            system(&[root, ("VAULT_TLS_SYSTEM_ROOTS", "false")]),
            Ok(false)
        );
        assert_eq!(system(&[("VAULT_TLS_SYSTEM_ROOTS", "true")]), Ok(true));
        for bad in [
            &[root, ("VAULT_TLS_SYSTEM_ROOTS", "yes")][..],
            &[("VAULT_TLS_SYSTEM_ROOTS", "false")],
        ] {
            let e = system(bad).unwrap_err();
            assert_eq!(e.var, "VAULT_TLS_SYSTEM_ROOTS", "{e}");
        }
    }
}

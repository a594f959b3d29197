//! Settings of SPIFFE federation: which foreign trust domains this mesh
//! trusts, where each one's bundle comes from (`FEDERATION_CONFIG`, a JSON
//! file), and the bounds on reading them (`FEDERATION_*`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::duration::parse_go_duration;
use crate::trust::spiffe_bundle::TrustDomain;

/// Default of `FEDERATION_REFRESH_MIN`: a bundle endpoint cannot make the
/// agent ask more often than this, whatever its refresh hint says.
pub const DEFAULT_REFRESH_MIN: Duration = Duration::from_secs(30);
/// Default of `FEDERATION_REFRESH_MAX`: a bundle is read at least this often.
pub const DEFAULT_REFRESH_MAX: Duration = Duration::from_secs(3600);
/// How often a bundle is read when its endpoint gives no refresh hint
/// (SPIRE's default hint), within the bounds above.
pub const DEFAULT_FEDERATION_REFRESH: Duration = Duration::from_secs(300);
/// Default of `FEDERATION_MAX_BUNDLE_BYTES`.
pub const DEFAULT_MAX_BUNDLE_BYTES: usize = 1 << 20;
/// Largest `FEDERATION_CONFIG` file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The federated trust domains and how their bundles are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// `FEDERATION_CONFIG`: where the domains were read from.
    pub path: PathBuf,
    pub domains: Vec<FederatedDomain>,
    /// `FEDERATION_REFRESH_MIN` and `FEDERATION_REFRESH_MAX`: the bounds a
    /// refresh hint is held to.
    pub refresh_min: Duration,
    pub refresh_max: Duration,
    /// `FEDERATION_MAX_BUNDLE_BYTES`: the most read of one bundle.
    pub max_bundle_bytes: usize,
}

/// One foreign trust domain and its bundle's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedDomain {
    pub trust_domain: TrustDomain,
    pub source: BundleSource,
}

/// Where a foreign trust domain's bundle is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSource {
    /// A SPIFFE bundle endpoint whose server is authenticated with Web PKI:
    /// the system's roots, or the CA certificates in `ca_file`.
    HttpsWeb {
        url: String,
        ca_file: Option<PathBuf>,
    },
    /// A SPIFFE bundle endpoint whose server presents an X.509-SVID for
    /// `endpoint_spiffe_id`, checked against the bootstrap bundle at first,
    /// then against the last bundle read from it.
    HttpsSpiffe {
        url: String,
        endpoint_spiffe_id: String,
        bootstrap_bundle: PathBuf,
    },
    /// A bundle file (SPIFFE JSON or PEM), re-read when it changes.
    File { path: PathBuf },
}

impl BundleSource {
    /// Where it reads from, for log lines.
    pub fn describe(&self) -> String {
        match self {
            BundleSource::HttpsWeb { url, .. } => format!("{url} (https_web)"),
            BundleSource::HttpsSpiffe { url, .. } => format!("{url} (https_spiffe)"),
            BundleSource::File { path } => format!("file {}", path.display()),
        }
    }
}

/// The file's shape, named after SPIRE's `federates_with` settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    trust_domains: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    bundle_endpoint_url: Option<String>,
    bundle_endpoint_profile: Option<String>,
    ca_file: Option<PathBuf>,
    endpoint_spiffe_id: Option<String>,
    bootstrap_bundle: Option<PathBuf>,
    bundle_file: Option<PathBuf>,
}

pub(super) fn federation_from_lookup(
    get: &impl Fn(&str) -> Option<String>,
    own_trust_domain: &str,
) -> Result<Option<FederationConfig>, ConfigError> {
    let duration = |var: &'static str, default: Duration| match get(var) {
        None => Ok(default),
        Some(v) => match parse_go_duration(&v) {
            Ok(d) if d >= Duration::from_secs(1) => Ok(d),
            Ok(_) => Err(ConfigError::new(var, v, "must be at least 1s")),
            Err(e) => Err(ConfigError::new(var, v, e.to_string())),
        },
    };
    let refresh_min = duration("FEDERATION_REFRESH_MIN", DEFAULT_REFRESH_MIN)?;
    let refresh_max = duration("FEDERATION_REFRESH_MAX", DEFAULT_REFRESH_MAX)?;
    if refresh_max < refresh_min {
        return Err(ConfigError::new(
            "FEDERATION_REFRESH_MAX",
            format!("{}s", refresh_max.as_secs()),
            format!(
                "must be at least FEDERATION_REFRESH_MIN ({}s)",
                refresh_min.as_secs()
            ),
        ));
    }
    let max_bundle_bytes = match get("FEDERATION_MAX_BUNDLE_BYTES") {
        None => DEFAULT_MAX_BUNDLE_BYTES,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1024..=(64 << 20)).contains(&n) => n,
            _ => {
                return Err(ConfigError::new(
                    "FEDERATION_MAX_BUNDLE_BYTES",
                    v,
                    "must be a number of bytes from 1024 to 67108864",
                ))
            }
        },
    };
    let Some(path) = get("FEDERATION_CONFIG").map(PathBuf::from) else {
        return Ok(None);
    };
    let domains = read_domains(&path, own_trust_domain).map_err(|reason| {
        ConfigError::new("FEDERATION_CONFIG", path.display().to_string(), reason)
    })?;
    Ok(Some(FederationConfig {
        path,
        domains,
        refresh_min,
        refresh_max,
        max_bundle_bytes,
    }))
}

fn read_domains(path: &Path, own: &str) -> Result<Vec<FederatedDomain>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut text = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    let file: File = serde_json::from_slice(&text).map_err(|e| {
        format!("not a federation file (JSON: {{\"trust_domains\": {{\"<name>\": {{...}}}}}}): {e}")
    })?;
    file.trust_domains
        .into_iter()
        .map(|(name, e)| {
            let trust_domain = TrustDomain::parse(&name).map_err(|e| e.to_string())?;
            if trust_domain.as_str() == own {
                return Err(format!(
                    "{name} is this mesh's own trust domain (TRUST_DOMAIN); its roots come from the CA"
                ));
            }
            let source = entry_source(&e).map_err(|r| format!("trust domain {name}: {r}"))?;
            Ok(FederatedDomain {
                trust_domain,
                source,
            })
        })
        .collect()
}

fn entry_source(e: &Entry) -> Result<BundleSource, String> {
    let url = |u: &String| {
        if u.starts_with("https://") {
            Ok(u.clone())
        } else {
            Err(format!(
                "bundle_endpoint_url {u:?} must start with https://"
            ))
        }
    };
    match (&e.bundle_file, &e.bundle_endpoint_url) {
        (Some(_), Some(_)) => Err("give bundle_file or bundle_endpoint_url, not both".into()),
        (None, None) => {
            Err("give bundle_endpoint_url (with bundle_endpoint_profile) or bundle_file".into())
        }
        (Some(path), None) => {
            if e.bundle_endpoint_profile.is_some()
                || e.ca_file.is_some()
                || e.endpoint_spiffe_id.is_some()
                || e.bootstrap_bundle.is_some()
            {
                return Err("bundle_file takes no endpoint settings".into());
            }
            Ok(BundleSource::File { path: path.clone() })
        }
        (None, Some(u)) => match e.bundle_endpoint_profile.as_deref() {
            Some("https_web") => {
                if e.endpoint_spiffe_id.is_some() || e.bootstrap_bundle.is_some() {
                    return Err("endpoint_spiffe_id and bootstrap_bundle belong to the https_spiffe profile".into());
                }
                Ok(BundleSource::HttpsWeb {
                    url: url(u)?,
                    ca_file: e.ca_file.clone(),
                })
            }
            Some("https_spiffe") => {
                if e.ca_file.is_some() {
                    return Err("ca_file belongs to the https_web profile".into());
                }
                let id = e
                    .endpoint_spiffe_id
                    .clone()
                    .ok_or("the https_spiffe profile needs endpoint_spiffe_id")?;
                let td = id
                    .strip_prefix("spiffe://")
                    .and_then(|r| r.split('/').next());
                if td.is_none_or(|td| TrustDomain::parse(td).is_err()) {
                    return Err(format!("endpoint_spiffe_id {id:?} is not a SPIFFE ID"));
                }
                Ok(BundleSource::HttpsSpiffe {
                    url: url(u)?,
                    endpoint_spiffe_id: id,
                    bootstrap_bundle: e
                        .bootstrap_bundle
                        .clone()
                        .ok_or("the https_spiffe profile needs bootstrap_bundle")?,
                })
            }
            Some(other) => Err(format!(
                "bundle_endpoint_profile {other:?} is not https_web or https_spiffe"
            )),
            None => Err(
                "bundle_endpoint_url needs bundle_endpoint_profile (https_web or https_spiffe)"
                    .into(),
            ),
        },
    }
}

#[cfg(test)]
#[path = "federation_tests.rs"]
mod tests;

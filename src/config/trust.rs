//! Settings of the trust bundle (`ROOTCA`).

use std::path::PathBuf;
use std::time::Duration;

use super::ConfigError;
use crate::duration::parse_go_duration;

/// Default of `TRUST_REFRESH_INTERVAL`.
pub const DEFAULT_TRUST_REFRESH: Duration = Duration::from_secs(300);
/// Default of `TRUST_ROOT_RETENTION`: the default `SECRET_TTL`, so that an
/// agent with short certificates still keeps a removed root as long as a
/// peer with default certificates may present one chaining to it.
pub const DEFAULT_ROOT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Where `ROOTCA` comes from and how long removed roots stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustConfig {
    /// `TRUST_REFRESH_INTERVAL`: how often the CA's roots are read.
    pub refresh_interval: Duration,
    /// `TRUST_ROOT_RETENTION`: least time a root that left the CA stays served.
    pub root_retention: Duration,
    /// `TRUST_EXTRA_ROOTS`: a PEM file of extra roots.
    pub extra_roots: Option<PathBuf>,
}

pub(super) fn trust_from_lookup(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<TrustConfig, ConfigError> {
    let duration = |var: &'static str, default: Duration, min: Duration| match get(var) {
        None => Ok(default),
        Some(v) => match parse_go_duration(&v) {
            Ok(d) if d >= min => Ok(d),
            Ok(_) => Err(ConfigError::new(
                var,
                v,
                format!("must be at least {}s", min.as_secs()),
            )),
            Err(e) => Err(ConfigError::new(var, v, e.to_string())),
        },
    };
    Ok(TrustConfig {
        refresh_interval: duration(
            "TRUST_REFRESH_INTERVAL",
            DEFAULT_TRUST_REFRESH,
            Duration::from_secs(1),
        )?,
        root_retention: duration(
            "TRUST_ROOT_RETENTION",
            DEFAULT_ROOT_RETENTION,
            Duration::ZERO,
        )?,
        extra_roots: get("TRUST_EXTRA_ROOTS").map(PathBuf::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<TrustConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        trust_from_lookup(&|k: &str| map.get(k).cloned())
    }

    #[test]
    fn defaults_values_and_bad_values_named() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.refresh_interval, Duration::from_secs(300));
        assert_eq!(c.root_retention, Duration::from_secs(86400));
        assert_eq!(c.extra_roots, None);
        let c = cfg(&[
            ("TRUST_REFRESH_INTERVAL", "2s"),
            ("TRUST_ROOT_RETENTION", "0"),
            ("TRUST_EXTRA_ROOTS", "/etc/extra.pem"),
        ])
        .unwrap();
        assert_eq!(c.refresh_interval, Duration::from_secs(2));
        assert_eq!(c.root_retention, Duration::ZERO);
        assert_eq!(c.extra_roots, Some(PathBuf::from("/etc/extra.pem")));
        for (var, bad) in [
            ("TRUST_REFRESH_INTERVAL", "0"),
            ("TRUST_REFRESH_INTERVAL", "often"),
            ("TRUST_ROOT_RETENTION", "-1h"),
        ] {
            assert_eq!(cfg(&[(var, bad)]).unwrap_err().var, var, "{var}={bad}");
        }
    }
}

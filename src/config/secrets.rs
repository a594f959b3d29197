//! Bounds of the secret cache: how many identities, and how many JWTs per
//! identity, the agent keeps.

use super::ConfigError;

/// `MAX_IDENTITIES` and `MAX_JWTS_PER_IDENTITY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretLimits {
    /// Most identities cached; a new one past it is refused with
    /// `RESOURCE_EXHAUSTED` before the CA is asked.
    pub max_identities: usize,
    /// Most JWTs remembered per identity for its renewals.
    pub max_jwts_per_identity: usize,
}

pub(super) fn secret_limits_from_lookup(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<SecretLimits, ConfigError> {
    let count = |var: &'static str, default: usize, max: usize| match get(var) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                var,
                v,
                format!("must be a whole number from 1 to {max}"),
            )),
        },
    };
    Ok(SecretLimits {
        max_identities: count(
            "MAX_IDENTITIES",
            crate::secrets::DEFAULT_MAX_IDENTITIES,
            1_000_000,
        )?,
        max_jwts_per_identity: count(
            "MAX_JWTS_PER_IDENTITY",
            crate::secrets::DEFAULT_MAX_JWTS_PER_IDENTITY,
            1024,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<SecretLimits, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        secret_limits_from_lookup(&|k: &str| map.get(k).cloned())
    }

    #[test]
    fn defaults_values_and_bad_values_named() {
        let c = cfg(&[]).unwrap();
        assert_eq!((c.max_identities, c.max_jwts_per_identity), (1024, 8));
        let c = cfg(&[("MAX_IDENTITIES", "3"), ("MAX_JWTS_PER_IDENTITY", "1")]).unwrap();
        assert_eq!((c.max_identities, c.max_jwts_per_identity), (3, 1));
        for (var, bad) in [
            ("MAX_IDENTITIES", "0"),
            ("MAX_IDENTITIES", "lots"),
            ("MAX_JWTS_PER_IDENTITY", "5000"),
        ] {
            assert_eq!(cfg(&[(var, bad)]).unwrap_err().var, var, "{var}={bad}");
        }
    }
}

//! Vault's load as OpenBao's audit log tells it: every request is a JSON line
//! with `request.path`; a login's JWT appears HMAC'd (so distinct JWTs stay
//! distinct), and a sign request carries the token's metadata, which names
//! the service account it was issued to.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

/// A position in the audit log, to count what happened after it.
pub fn mark(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct VaultLoad {
    pub identities: usize,
    pub logins: usize,
    pub signs: usize,
    pub logins_per_identity: f64,
    pub signs_per_identity: f64,
    /// Distinct JWTs presented at login.
    pub distinct_jwts: usize,
    /// The most logins any one JWT caused.
    pub max_logins_per_jwt: usize,
    /// Service accounts that had a CSR signed.
    pub signed_identities: usize,
    /// The most signs any one service account had.
    pub max_signs_per_identity: usize,
    pub min_signs_per_identity: usize,
}

/// Counts logins on `login_path` and signs on `sign_path` audited since `from`.
pub fn count(
    log: &Path,
    from: u64,
    login_path: &str,
    sign_path: &str,
    identities: usize,
) -> anyhow::Result<VaultLoad> {
    let mut f = std::fs::File::open(log)?;
    f.seek(SeekFrom::Start(from))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let mut per_jwt: HashMap<String, usize> = HashMap::new();
    let mut per_sa: HashMap<String, usize> = HashMap::new();
    let (mut logins, mut signs) = (0, 0);
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if e["type"] != "request" {
            continue;
        }
        let path = e["request"]["path"].as_str().unwrap_or_default();
        if path == login_path {
            logins += 1;
            let jwt = e["request"]["data"]["jwt"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            *per_jwt.entry(jwt).or_default() += 1;
        } else if path == sign_path {
            signs += 1;
            let md = &e["auth"]["metadata"];
            let sa = format!(
                "{}/{}",
                md["service_account_namespace"].as_str().unwrap_or("?"),
                md["service_account_name"].as_str().unwrap_or("?")
            );
            *per_sa.entry(sa).or_default() += 1;
        }
    }
    let n = identities.max(1) as f64;
    Ok(VaultLoad {
        identities,
        logins,
        signs,
        logins_per_identity: logins as f64 / n,
        signs_per_identity: signs as f64 / n,
        distinct_jwts: per_jwt.len(),
        max_logins_per_jwt: per_jwt.values().copied().max().unwrap_or(0),
        signed_identities: per_sa.len(),
        max_signs_per_identity: per_sa.values().copied().max().unwrap_or(0),
        min_signs_per_identity: per_sa.values().copied().min().unwrap_or(0),
    })
}

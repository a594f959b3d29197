//! The SPIFFE bundle format (SPIFFE Trust Domain and Bundle, §4): a JWK Set
//! whose `x509-svid` keys each carry one root certificate in `x5c`, with
//! `spiffe_sequence` and `spiffe_refresh_hint`. Read from a foreign trust
//! domain's bundle endpoint and written by `node-agent bundle-endpoint`.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

use crate::crypto::der_to_pem;

/// A SPIFFE trust domain name: `other.example`, without the scheme.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

/// Why a trust domain name, or a bundle, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error(
        "{0:?} is not a trust domain name: 1 to 255 of a-z, 0-9, '.', '-' and '_' \
         (with or without spiffe://)"
    )]
    BadTrustDomain(String),
    #[error("not a SPIFFE bundle (a JWK Set in JSON): {0}")]
    NotJson(String),
    #[error("x509-svid key {index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("the bundle has {found} keys, more than the {max} allowed")]
    TooManyKeys { found: usize, max: usize },
    #[error("the bundle holds no x509-svid root; a trust domain with no roots trusts nothing")]
    NoRoots,
}

impl TrustDomain {
    /// Accepts `other.example` or `spiffe://other.example`.
    pub fn parse(s: &str) -> Result<Self, BundleError> {
        let name = s.strip_prefix("spiffe://").unwrap_or(s);
        let ok = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(name.to_string()))
        } else {
            Err(BundleError::BadTrustDomain(
                crate::endpoint::warn::shorten(s, 64).to_string(),
            ))
        }
    }

    /// `other.example`: the name Envoy's SPIFFE validator takes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://other.example`: the key of a bundle in the Workload API.
    pub fn id(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl std::fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The most keys a bundle may hold; a real one holds a handful.
pub const MAX_KEYS: usize = 1024;

/// A bundle as read: its roots (DER, in the bundle's order) and its hints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeBundle {
    pub roots: Vec<Vec<u8>>,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<Duration>,
}

impl SpiffeBundle {
    /// The roots as PEM, one block each.
    pub fn pems(&self) -> Vec<String> {
        self.roots.iter().map(|d| der_to_pem(d)).collect()
    }
}

#[derive(Serialize, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize, Deserialize, Default)]
struct Jwk {
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    use_: Option<String>,
    #[serde(default)]
    kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

/// Reads a SPIFFE bundle. Keys for other uses (`jwt-svid`, or a use this
/// version does not know) are skipped, as the specification asks; an
/// `x509-svid` key must carry exactly one certificate whose public key is
/// the key's own. A bundle with no root is refused.
pub fn parse(json: &[u8]) -> Result<SpiffeBundle, BundleError> {
    let jwks: Jwks =
        serde_json::from_slice(json).map_err(|e| BundleError::NotJson(e.to_string()))?;
    if jwks.keys.len() > MAX_KEYS {
        return Err(BundleError::TooManyKeys {
            found: jwks.keys.len(),
            max: MAX_KEYS,
        });
    }
    let mut roots = Vec::new();
    for (index, key) in jwks.keys.iter().enumerate() {
        if key.use_.as_deref() != Some("x509-svid") {
            continue;
        }
        let bad = |reason: String| BundleError::BadKey { index, reason };
        let x5c = key.x5c.as_deref().unwrap_or_default();
        if x5c.len() != 1 {
            return Err(bad(format!(
                "x5c must hold exactly one certificate, it holds {}",
                x5c.len()
            )));
        }
        let der = STANDARD
            .decode(&x5c[0])
            .map_err(|e| bad(format!("x5c is not base64: {e}")))?;
        let expected = jwk_for(&der).map_err(bad)?;
        if expected.kty != key.kty
            || expected.crv != key.crv
            || expected.x != key.x
            || expected.y != key.y
            || expected.n != key.n
            || expected.e != key.e
        {
            return Err(bad(
                "its key parameters are not the public key of its certificate".into(),
            ));
        }
        if !roots.contains(&der) {
            roots.push(der);
        }
    }
    if roots.is_empty() {
        return Err(BundleError::NoRoots);
    }
    Ok(SpiffeBundle {
        roots,
        sequence: jwks.spiffe_sequence,
        refresh_hint: jwks.spiffe_refresh_hint.map(Duration::from_secs),
    })
}

/// Writes a SPIFFE bundle of `roots` (DER).
pub fn to_json(
    roots: &[Vec<u8>],
    sequence: u64,
    refresh_hint: Duration,
) -> Result<String, BundleError> {
    let keys = roots
        .iter()
        .enumerate()
        .map(|(index, der)| jwk_for(der).map_err(|reason| BundleError::BadKey { index, reason }))
        .collect::<Result<Vec<_>, _>>()?;
    let jwks = Jwks {
        keys,
        spiffe_sequence: Some(sequence),
        spiffe_refresh_hint: Some(refresh_hint.as_secs().max(1)),
    };
    serde_json::to_string_pretty(&jwks).map_err(|e| BundleError::NotJson(e.to_string()))
}

/// The JWK of a certificate: its public key's parameters, `use` x509-svid
/// and the certificate in `x5c`.
fn jwk_for(der: &[u8]) -> Result<Jwk, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let spki = cert.public_key();
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let mut jwk = Jwk {
        use_: Some("x509-svid".into()),
        x5c: Some(vec![STANDARD.encode(der)]),
        ..Default::default()
    };
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            let (crv, len) = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256", 32),
                Some("1.3.132.0.34") => ("P-384", 48),
                Some("1.3.132.0.35") => ("P-521", 66),
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err("the EC point is not uncompressed".into());
            }
            jwk.kty = "EC".into();
            jwk.crv = Some(crv.into());
            jwk.x = Some(b64(&data[1..1 + len]));
            jwk.y = Some(b64(&data[1 + len..]));
        }
        Ok(PublicKey::RSA(rsa)) => {
            let trim = |b: &[u8]| {
                let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
                b[start..].to_vec()
            };
            jwk.kty = "RSA".into();
            jwk.n = Some(b64(&trim(rsa.modulus)));
            jwk.e = Some(b64(&trim(rsa.exponent)));
        }
        Ok(_) => return Err("unsupported public key type (EC or RSA only)".into()),
        Err(e) => return Err(format!("cannot read its public key: {e}")),
    }
    Ok(jwk)
}

#[cfg(test)]
#[path = "spiffe_bundle_tests.rs"]
mod tests;

//! The X.509-SVID rules for a leaf certificate, as SPIFFE's X509-SVID
//! standard (§4, §5.2) sets them and SPIFFE clients (go-spiffe, py-spiffe,
//! the `spiffe` crate) check them:
//!
//! - exactly one URI SAN (the SPIFFE ID);
//! - `basicConstraints` present, with `cA` false;
//! - `keyUsage` with `digitalSignature`, and neither `keyCertSign` nor
//!   `cRLSign`;
//!
//! and, from RFC 8813 §3, no `keyEncipherment` on an EC key
//! (`id-ecPublicKey`): an EC key cannot encipher a key, and RFC 5280
//! linters report the bit as an error.
//!
//! These checks only read the certificate. Which breaches refuse a leaf
//! and which are only warned about is [`Breach::refused`]; what an operator
//! changes to fix one is [`Breach::fix`]. The chain itself (key, identity,
//! validity, signatures) is checked by [`super::verify_issued`].

use std::fmt;

use x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
use x509_parser::prelude::*;

use super::cert::{parse_cert, pem_to_der};
use super::CryptoError;

/// One X.509-SVID rule for a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SvidRule {
    /// Exactly one URI SAN.
    OneUriSan,
    /// A `basicConstraints` extension.
    BasicConstraints,
    /// `cA` false.
    NotCa,
    /// `keyUsage` with `digitalSignature`.
    DigitalSignature,
    /// No `keyCertSign`.
    NoKeyCertSign,
    /// No `cRLSign`.
    NoCrlSign,
    /// No `keyEncipherment` on an EC key.
    NoKeyEnciphermentOnEc,
}

/// A rule a leaf breaks, with what the leaf has instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub rule: SvidRule,
    /// What the leaf holds, e.g. `its keyUsage has keyEncipherment on an EC key`.
    pub found: String,
}

impl Breach {
    fn new(rule: SvidRule, found: impl Into<String>) -> Self {
        Self {
            rule,
            found: found.into(),
        }
    }

    /// True when the leaf must not be served. A leaf that is a CA
    /// (`cA=true`) or may sign certificates (`keyCertSign`) would hand a
    /// workload a certificate authority's powers, and every SPIFFE verifier
    /// rejects it; a leaf without exactly one URI SAN names no single
    /// identity. The other breaches leave a certificate Envoy accepts: it
    /// is served, and the operator is warned.
    pub fn refused(&self) -> bool {
        matches!(
            self.rule,
            SvidRule::OneUriSan | SvidRule::NotCa | SvidRule::NoKeyCertSign
        )
    }

    /// What to change so that the CA's next leaf keeps the rule, naming the
    /// Vault PKI role's setting where there is one.
    pub fn fix(&self) -> &'static str {
        match self.rule {
            SvidRule::OneUriSan => {
                "with Vault, the PKI role must sign the CSR's one URI SAN and add none (use_csr_sans=true, no other SANs allowed)"
            }
            SvidRule::BasicConstraints => {
                "with Vault, set basic_constraints_valid_for_non_ca=true on the PKI role"
            }
            SvidRule::NotCa => {
                "with Vault, VAULT_SIGN_CSR_PATH must be a PKI role's sign path, <mount>/sign/<role>, not one that signs intermediates"
            }
            SvidRule::DigitalSignature
            | SvidRule::NoKeyCertSign
            | SvidRule::NoCrlSign
            | SvidRule::NoKeyEnciphermentOnEc => {
                "with Vault, set key_usage=[\"DigitalSignature\"] on the PKI role"
            }
        }
    }
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.found, self.fix())
    }
}

/// Every rule `leaf` breaks, in the order of [`SvidRule`]; empty when it is
/// a valid X.509-SVID. An extension that does not parse (or appears twice)
/// counts as absent.
pub(super) fn check(leaf: &X509Certificate<'_>) -> Vec<Breach> {
    let mut out = Vec::new();

    let uris = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter(|n| matches!(n, GeneralName::URI(_)))
            .count(),
        _ => 0,
    };
    if uris != 1 {
        out.push(Breach::new(
            SvidRule::OneUriSan,
            format!("it has {uris} URI SANs, not exactly one"),
        ));
    }

    match leaf.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => out.push(Breach::new(
            SvidRule::NotCa,
            "its basicConstraints say cA=true",
        )),
        Ok(Some(_)) => {}
        _ => out.push(Breach::new(
            SvidRule::BasicConstraints,
            "it has no basicConstraints extension",
        )),
    }

    let ku = leaf.key_usage().ok().flatten().map(|ku| *ku.value);
    match ku {
        Some(ku) if ku.digital_signature() => {}
        Some(_) => out.push(Breach::new(
            SvidRule::DigitalSignature,
            "its keyUsage lacks digitalSignature",
        )),
        None => out.push(Breach::new(
            SvidRule::DigitalSignature,
            "it has no keyUsage extension (digitalSignature is required)",
        )),
    }
    if let Some(ku) = ku {
        if ku.key_cert_sign() {
            out.push(Breach::new(
                SvidRule::NoKeyCertSign,
                "its keyUsage has keyCertSign",
            ));
        }
        if ku.crl_sign() {
            out.push(Breach::new(SvidRule::NoCrlSign, "its keyUsage has cRLSign"));
        }
        if ku.key_encipherment() && is_ec(leaf) {
            out.push(Breach::new(
                SvidRule::NoKeyEnciphermentOnEc,
                "its keyUsage has keyEncipherment on an EC key (RFC 8813 forbids it)",
            ));
        }
    }
    out
}

/// [`check`] of the first certificate of `pem`.
pub fn check_pem(pem: &str) -> Result<Vec<Breach>, CryptoError> {
    let der = pem_to_der(pem)?.swap_remove(0);
    Ok(check(&parse_cert(&der)?))
}

fn is_ec(cert: &X509Certificate<'_>) -> bool {
    cert.public_key().algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
}

/// The breaches, one after the other, for a log line or an error.
pub fn describe(breaches: &[Breach]) -> String {
    breaches
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
#[path = "svid_rules_tests.rs"]
mod tests;

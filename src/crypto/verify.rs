//! The checks every certificate chain a CA issues passes before it is
//! served.

use std::time::{Duration, SystemTime};

use x509_parser::prelude::*;

use super::cert::{asn1_to_system_time, parse_cert, pem_to_der, self_signed, signed_by};
use super::svid_rules::{self, Breach};
use super::CryptoError;
use crate::identity::SpiffeId;

/// A certificate chain as served to Envoy: leaf first, then intermediates, and
/// the root(s) it chains to. PEM throughout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedChain {
    /// Leaf followed by intermediates (no root), PEM.
    pub chain_pem: Vec<String>,
    /// The root certificate(s), PEM.
    pub roots_pem: Vec<String>,
}

/// Facts read from a checked leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The X.509-SVID rules the leaf breaks without being refused for it
    /// (see [`Breach::refused`]): it is served, and the operator warned.
    pub svid_breaches: Vec<Breach>,
}

/// Clocks may disagree with the CA's by this much.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Checks that `cert` is within its validity at `now` (with [`CLOCK_SKEW`]
/// for its start), naming it as `what` otherwise.
fn check_validity(
    cert: &X509Certificate<'_>,
    what: &str,
    now: SystemTime,
) -> Result<(), CryptoError> {
    let not_before = asn1_to_system_time(cert.validity().not_before);
    let not_after = asn1_to_system_time(cert.validity().not_after);
    if now + CLOCK_SKEW < not_before || now >= not_after {
        let subject = cert.subject().to_string();
        let named = if subject.is_empty() {
            String::new()
        } else {
            format!(" {subject:?}")
        };
        return Err(CryptoError::BadCertificate(format!(
            "{what}{named} is not valid now (valid from {} to {})",
            cert.validity().not_before,
            cert.validity().not_after
        )));
    }
    Ok(())
}

/// Checks an answer from any CA before it may be served:
/// the leaf carries our public key, exactly the SPIFFE ID asked for as URI
/// SAN; every certificate of the chain and every root served is within its
/// validity; every root served is self-signed; and every certificate is
/// signed by the next one up to a served root (the trust anchor Envoy will be
/// given); and the leaf is refused if it breaks an X.509-SVID rule that
/// [`Breach::refused`] says refuses it. The rules it breaks otherwise are
/// returned in [`LeafInfo::svid_breaches`].
pub fn verify_issued(
    chain: &IssuedChain,
    expected_spki_der: &[u8],
    expected_id: &SpiffeId,
    now: SystemTime,
) -> Result<LeafInfo, CryptoError> {
    let bad = |m: String| CryptoError::BadCertificate(m);
    let mut ders = Vec::new();
    for pem in &chain.chain_pem {
        ders.extend(pem_to_der(pem)?);
    }
    let mut root_ders = Vec::new();
    for pem in &chain.roots_pem {
        root_ders.extend(pem_to_der(pem)?);
    }
    if ders.is_empty() {
        return Err(bad("the CA returned no certificate".into()));
    }
    if root_ders.is_empty() {
        return Err(bad("the CA returned no root certificate".into()));
    }
    let certs: Vec<X509Certificate<'_>> = ders
        .iter()
        .map(|d| parse_cert(d))
        .collect::<Result<_, _>>()?;
    let roots: Vec<X509Certificate<'_>> = root_ders
        .iter()
        .map(|d| parse_cert(d))
        .collect::<Result<_, _>>()?;
    let leaf = &certs[0];

    if leaf.public_key().raw != expected_spki_der {
        return Err(bad(
            "the certificate is not for the key this agent generated".into(),
        ));
    }
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris.as_slice() != [expected_id.as_str()] {
        return Err(bad(format!(
            "the certificate's URI SANs are {uris:?}, expected exactly [{:?}]",
            expected_id.as_str()
        )));
    }
    let (refused, svid_breaches): (Vec<Breach>, Vec<Breach>) = svid_rules::check(leaf)
        .into_iter()
        .partition(Breach::refused);
    if !refused.is_empty() {
        return Err(CryptoError::NotSvid(refused));
    }
    // Every certificate Envoy will hold or trust must be valid now: an
    // expired intermediate or root fails every handshake as surely as an
    // expired leaf.
    for (i, cert) in certs.iter().enumerate() {
        let what = if i == 0 {
            "the certificate"
        } else {
            "the intermediate"
        };
        check_validity(cert, what, now)?;
    }
    for root in &roots {
        if !self_signed(root) {
            return Err(bad(format!(
                "the root served ({:?}) is not self-signed: a trust anchor must be a root, not an \
                 intermediate",
                root.subject().to_string()
            )));
        }
        check_validity(root, "the root", now)?;
    }

    // Walk up: each certificate must be signed by the next; the last one by a root.
    for (i, cert) in certs.iter().enumerate() {
        match certs.get(i + 1) {
            Some(issuer) => {
                if !signed_by(cert, Some(issuer.public_key())) {
                    return Err(bad(format!(
                        "certificate {:?} is not signed by {:?}",
                        cert.subject().to_string(),
                        issuer.subject().to_string()
                    )));
                }
            }
            None => {
                if !roots
                    .iter()
                    .any(|r| r.subject() == cert.issuer() && signed_by(cert, Some(r.public_key())))
                {
                    return Err(bad(format!(
                        "the chain does not verify up to the root served (no root for issuer {})",
                        cert.issuer()
                    )));
                }
            }
        }
        if i > 0 && !cert.is_ca() {
            return Err(bad(format!("intermediate {} is not a CA", cert.subject())));
        }
    }
    Ok(LeafInfo {
        serial_hex: leaf.raw_serial_as_string(),
        not_before: asn1_to_system_time(leaf.validity().not_before),
        not_after: asn1_to_system_time(leaf.validity().not_after),
        svid_breaches,
    })
}

//! Reading certificates: PEM to DER and back, their facts, and who issued
//! whom.

use std::time::{Duration, SystemTime};

use x509_parser::prelude::*;

use super::CryptoError;

pub fn pem_to_der(pem: &str) -> Result<Vec<Vec<u8>>, CryptoError> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block =
            block.map_err(|e| CryptoError::BadCertificate(format!("malformed PEM: {e}")))?;
        if block.label != "CERTIFICATE" {
            return Err(CryptoError::BadCertificate(format!(
                "expected a CERTIFICATE PEM block, found {:?}",
                block.label
            )));
        }
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err(CryptoError::BadCertificate(
            "no PEM certificate found".into(),
        ));
    }
    Ok(out)
}

/// Splits PEM text holding one or more certificates into one PEM string each,
/// normalised, so that duplicates can be recognised.
pub fn split_pem_certs(pem: &str) -> Result<Vec<String>, CryptoError> {
    Ok(pem_to_der(pem)?.iter().map(|der| der_to_pem(der)).collect())
}

pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

pub(super) fn asn1_to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

pub(super) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, CryptoError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CryptoError::BadCertificate(format!("not an X.509 certificate: {e}")))
}

/// The NotAfter of the first certificate in `pem`.
pub fn cert_not_after(pem: &str) -> Option<SystemTime> {
    let der = pem_to_der(pem).ok()?.into_iter().next()?;
    let cert = parse_cert(&der).ok()?;
    Some(asn1_to_system_time(cert.validity().not_after))
}

/// The first certificate of `pem`, parsed, or `None`.
fn with_first_cert<R>(pem: &str, f: impl FnOnce(&X509Certificate<'_>) -> R) -> Option<R> {
    let der = pem_to_der(pem).ok()?.into_iter().next()?;
    let cert = parse_cert(&der).ok()?;
    Some(f(&cert))
}

pub(super) fn self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject() == cert.issuer() && signed_by(cert, None)
}

/// How many CA signatures, and how many leaf signatures, [`signed_by`]
/// remembers.
const VERIFIED_CA_SIGNATURES: usize = 256;
const VERIFIED_LEAF_SIGNATURES: usize = 64;

type Verified = std::sync::Mutex<Option<std::collections::HashSet<[u8; 32]>>>;

/// Signatures verified, each the digest of a certificate and the key that
/// verified it: CA certificates, and leaves apart, so that a stream of new
/// leaves never pushes the few roots out.
static VERIFIED_CA: Verified = std::sync::Mutex::new(None);
static VERIFIED_LEAF: Verified = std::sync::Mutex::new(None);

/// True when `cert`'s signature verifies with `issuer` (with its own key when
/// `None`). A signature check is the dearest part of reading a sign answer,
/// and the same ones recur: every issued chain ends in the same few roots and
/// intermediates, and a new leaf is checked once where its root is chosen
/// and again where the whole chain is. So a signature verified with a key is
/// remembered by the digest of the certificate's bytes and the key's; a
/// failure is never remembered.
pub(super) fn signed_by(
    cert: &X509Certificate<'_>,
    issuer: Option<&SubjectPublicKeyInfo<'_>>,
) -> bool {
    use sha2::{Digest, Sha256};
    let (verified, max) = if cert.is_ca() {
        (&VERIFIED_CA, VERIFIED_CA_SIGNATURES)
    } else {
        (&VERIFIED_LEAF, VERIFIED_LEAF_SIGNATURES)
    };
    let key = issuer.unwrap_or_else(|| cert.public_key());
    let mut digest = Sha256::new();
    digest.update((cert.as_ref().len() as u64).to_be_bytes());
    digest.update(cert.as_ref());
    digest.update(key.raw);
    let digest: [u8; 32] = digest.finalize().into();
    let lock = || verified.lock().unwrap_or_else(|e| e.into_inner());
    if lock().as_ref().is_some_and(|seen| seen.contains(&digest)) {
        return true;
    }
    if cert.verify_signature(issuer).is_err() {
        return false;
    }
    let mut seen = lock();
    let seen = seen.get_or_insert_with(Default::default);
    if seen.len() >= max {
        seen.clear();
    }
    seen.insert(digest);
    true
}

/// True when the first certificate of `pem` is self-signed: its issuer is its
/// subject and its own key verifies its signature (a root).
pub fn is_self_signed(pem: &str) -> bool {
    with_first_cert(pem, self_signed).unwrap_or(false)
}

/// True when the first certificate of `child` names the first of `issuer` as
/// its issuer and is signed by its key.
pub fn is_issued_by(child: &str, issuer: &str) -> bool {
    let (Some(child), Some(issuer)) = (
        pem_to_der(child).ok().and_then(|d| d.into_iter().next()),
        pem_to_der(issuer).ok().and_then(|d| d.into_iter().next()),
    ) else {
        return false;
    };
    let (Ok(child), Ok(issuer)) = (parse_cert(&child), parse_cert(&issuer)) else {
        return false;
    };
    child.issuer() == issuer.subject() && signed_by(&child, Some(issuer.public_key()))
}

/// Subject, serial (hex) and NotAfter of the first certificate of `pem`, for
/// log lines.
pub fn cert_summary(pem: &str) -> Option<(String, String, SystemTime)> {
    with_first_cert(pem, |c| {
        (
            c.subject().to_string(),
            c.raw_serial_as_string(),
            asn1_to_system_time(c.validity().not_after),
        )
    })
}

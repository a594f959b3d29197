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
    cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok()
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
    child.issuer() == issuer.subject() && child.verify_signature(Some(issuer.public_key())).is_ok()
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

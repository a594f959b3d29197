//! Keys, CSRs and the checks every issued certificate passes before it is served.
//!
//! The private key is made here and leaves the process only inside an SDS
//! response to Envoy. Its PEM is zeroed on drop and never printed.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use crate::identity::SpiffeId;

/// Errors from key generation, CSR creation and certificate checks.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key generation failed: {0}")]
    KeyGen(String),
    #[error("CSR creation failed: {0}")]
    Csr(String),
    #[error("invalid certificate from the CA: {0}")]
    BadCertificate(String),
}

/// The workload key algorithm (`KEY_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    EcP256,
    EcP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl KeyType {
    pub const ACCEPTED: &'static str = "ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096";

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    fn rsa_bits(self) -> Option<usize> {
        match self {
            KeyType::Rsa2048 => Some(2048),
            KeyType::Rsa3072 => Some(3072),
            KeyType::Rsa4096 => Some(4096),
            _ => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ec-p256" | "ecdsa-p256" | "p256" => Ok(KeyType::EcP256),
            "ec-p384" | "ecdsa-p384" | "p384" => Ok(KeyType::EcP384),
            "rsa-2048" | "rsa2048" => Ok(KeyType::Rsa2048),
            "rsa-3072" | "rsa3072" => Ok(KeyType::Rsa3072),
            "rsa-4096" | "rsa4096" => Ok(KeyType::Rsa4096),
            _ => Err(format!(
                "unknown key type; accepted values are {}",
                Self::ACCEPTED
            )),
        }
    }
}

/// A private key whose PEM (PKCS#8) is zeroed on drop and never shown.
pub struct PrivateKey {
    key_type: KeyType,
    pkcs8_pem: Zeroizing<String>,
    key_pair: KeyPair,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, redacted)", self.key_type)
    }
}

impl PrivateKey {
    /// Generates a fresh key. RSA keys are slow to make (hundreds of ms for
    /// 4096 bits): callers run this on a blocking thread.
    pub fn generate(key_type: KeyType) -> Result<Self, CryptoError> {
        let kg = |e: &dyn fmt::Display| CryptoError::KeyGen(e.to_string());
        let (pem, alg) = match key_type.rsa_bits() {
            Some(bits) => {
                use rsa::pkcs8::EncodePrivateKey;
                let key =
                    rsa::RsaPrivateKey::new(&mut rand::thread_rng(), bits).map_err(|e| kg(&e))?;
                let pem = key
                    .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                    .map_err(|e| kg(&e))?;
                (Zeroizing::new(pem.to_string()), &rcgen::PKCS_RSA_SHA256)
            }
            None => {
                let alg = match key_type {
                    KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                    _ => &rcgen::PKCS_ECDSA_P256_SHA256,
                };
                let kp = KeyPair::generate_for(alg).map_err(|e| kg(&e))?;
                (Zeroizing::new(kp.serialize_pem()), alg)
            }
        };
        let key_pair = KeyPair::from_pkcs8_pem_and_sign_algo(&pem, alg).map_err(|e| kg(&e))?;
        Ok(Self {
            key_type,
            pkcs8_pem: pem,
            key_pair,
        })
    }

    /// Loads a PKCS#8 PEM key (the local CA's persisted key).
    pub fn from_pem(pem: &str) -> Result<Self, CryptoError> {
        let key_pair = KeyPair::from_pem(pem)
            .map_err(|e| CryptoError::KeyGen(format!("cannot load key: {e}")))?;
        let key_type = if key_pair.algorithm() == &rcgen::PKCS_ECDSA_P384_SHA384 {
            KeyType::EcP384
        } else if key_pair.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            KeyType::EcP256
        } else {
            KeyType::Rsa2048
        };
        Ok(Self {
            key_type,
            pkcs8_pem: Zeroizing::new(pem.to_string()),
            key_pair,
        })
    }

    /// The PKCS#8 PEM, for Envoy (over SDS) and the local CA's 0600 key file only.
    pub fn pkcs8_pem(&self) -> &str {
        &self.pkcs8_pem
    }

    /// DER SubjectPublicKeyInfo, to check that an issued certificate is for this key.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key_pair)
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key_pair
    }

    /// A CSR with an empty subject and exactly one SAN, the URI `spiffe_id`.
    pub fn csr_pem(&self, spiffe_id: &SpiffeId) -> Result<String, CryptoError> {
        let csr_err = |e: &dyn fmt::Display| CryptoError::Csr(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| csr_err(&e))?;
        params.distinguished_name = DistinguishedName::new();
        let uri = spiffe_id
            .as_str()
            .to_string()
            .try_into()
            .map_err(|e| csr_err(&e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&self.key_pair)
            .map_err(|e| csr_err(&e))?;
        csr.pem().map_err(|e| csr_err(&e))
    }
}

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
}

fn pem_to_der(pem: &str) -> Result<Vec<Vec<u8>>, CryptoError> {
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

fn asn1_to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, CryptoError> {
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

fn self_signed(cert: &X509Certificate<'_>) -> bool {
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
/// given).
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
        let issuer = match certs.get(i + 1) {
            Some(next) => next,
            None => roots
                .iter()
                .find(|r| {
                    r.subject() == cert.issuer()
                        && cert.verify_signature(Some(r.public_key())).is_ok()
                })
                .ok_or_else(|| {
                    bad(format!(
                        "the chain does not verify up to the root served (no root for issuer {})",
                        cert.issuer()
                    ))
                })?,
        };
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|_| {
                bad(format!(
                    "certificate {:?} is not signed by {:?}",
                    cert.subject().to_string(),
                    issuer.subject().to_string()
                ))
            })?;
        if i > 0 && !cert.is_ca() {
            return Err(bad(format!("intermediate {} is not a CA", cert.subject())));
        }
    }
    Ok(LeafInfo {
        serial_hex: leaf.raw_serial_as_string(),
        not_before: asn1_to_system_time(leaf.validity().not_before),
        not_after: asn1_to_system_time(leaf.validity().not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_csr(pem: &str) -> (Vec<String>, String, Vec<u8>) {
        let der = pem_der(pem, "CERTIFICATE REQUEST");
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        csr.verify_signature().expect("CSR self-signature verifies");
        let info = &csr.certification_request_info;
        let mut uris = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for n in &san.general_names {
                    uris.push(format!("{n:?}"));
                }
            }
        }
        (
            uris,
            info.subject.to_string(),
            info.subject_pki.raw.to_vec(),
        )
    }

    fn pem_der(pem: &str, label: &str) -> Vec<u8> {
        let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(block.label, label);
        block.contents
    }

    #[test]
    fn csr_has_no_subject_and_only_the_spiffe_uri() {
        for kt in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
            let key = PrivateKey::generate(kt).unwrap();
            let id = SpiffeId("spiffe://cluster.local/ns/default/sa/httpbin".into());
            let (sans, subject, spki) = parse_csr(&key.csr_pem(&id).unwrap());
            assert_eq!(
                sans,
                vec![r#"URI("spiffe://cluster.local/ns/default/sa/httpbin")"#],
                "{kt}"
            );
            assert_eq!(subject, "", "{kt}: the CSR has no subject CN");
            assert_eq!(
                spki,
                key.public_key_der(),
                "{kt}: the CSR carries our public key"
            );
            // The PEM Envoy gets is a PKCS#8 key whose public half is the CSR's.
            let der = pem_der(key.pkcs8_pem(), "PRIVATE KEY");
            let reloaded = KeyPair::try_from(der.as_slice()).expect("a PKCS#8 DER key");
            assert_eq!(
                rcgen::PublicKeyData::subject_public_key_info(&reloaded),
                spki,
                "{kt}: the PKCS#8 key is the CSR's"
            );
        }
    }

    #[test]
    fn key_types_parse_and_debug_is_redacted() {
        assert_eq!("EC-P384".parse::<KeyType>(), Ok(KeyType::EcP384));
        assert_eq!("rsa-4096".parse::<KeyType>(), Ok(KeyType::Rsa4096));
        assert!("ed25519"
            .parse::<KeyType>()
            .unwrap_err()
            .contains("ec-p256"));
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
    }

    #[test]
    fn split_pem_normalises_and_rejects_garbage() {
        assert!(split_pem_certs("hello").is_err());
        assert!(
            split_pem_certs("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .is_err()
        );
    }

    /// A CA certificate (self-signed when `issuer` is `None`) valid from
    /// `from` to `to` (offsets from now, in hours).
    fn ca_cert(
        cn: &str,
        issuer: Option<&rcgen::Issuer<'_, KeyPair>>,
        from: i64,
        to: i64,
    ) -> (String, KeyPair, rcgen::CertificateParams) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let now = ::time::OffsetDateTime::now_utc();
        p.not_before = now + ::time::Duration::hours(from);
        p.not_after = now + ::time::Duration::hours(to);
        let cert = match issuer {
            None => p.self_signed(&key).unwrap(),
            Some(i) => p.signed_by(&key, i).unwrap(),
        };
        (cert.pem(), key, p)
    }

    /// root → intermediate → leaf for `id` on `leaf_key`, with the
    /// intermediate's and root's validity given as (from, to) in hours.
    fn chain(
        root_validity: (i64, i64),
        int_validity: (i64, i64),
        leaf_key: &PrivateKey,
        id: &SpiffeId,
    ) -> (String, String, String) {
        let (root_pem, root_key, root_params) =
            ca_cert("root", None, root_validity.0, root_validity.1);
        let root_issuer = rcgen::Issuer::new(root_params, root_key);
        let (int_pem, int_key, int_params) = ca_cert(
            "intermediate",
            Some(&root_issuer),
            int_validity.0,
            int_validity.1,
        );
        let int_issuer = rcgen::Issuer::new(int_params, int_key);
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&leaf_key.csr_pem(id).unwrap())
            .unwrap();
        let leaf = csr.signed_by(&int_issuer).unwrap();
        (leaf.pem(), int_pem, root_pem)
    }

    #[test]
    fn every_certificate_of_the_chain_must_be_valid_and_the_root_self_signed() {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let id = SpiffeId("spiffe://td/ns/a/sa/b".into());
        let now = SystemTime::now();
        let check = |root: (i64, i64), int: (i64, i64)| {
            let (leaf, int, root) = chain(root, int, &key, &id);
            verify_issued(
                &IssuedChain {
                    chain_pem: vec![leaf, int],
                    roots_pem: vec![root],
                },
                &key.public_key_der(),
                &id,
                now,
            )
        };
        check((-1, 100), (-1, 50)).expect("a valid chain passes");
        let err = check((-1, 100), (-10, -2)).unwrap_err().to_string();
        assert!(
            err.contains("the intermediate \"CN=intermediate\" is not valid now"),
            "{err}"
        );
        let err = check((-1, 100), (5, 50)).unwrap_err().to_string();
        assert!(
            err.contains("intermediate") && err.contains("not valid now"),
            "{err}"
        );
        let err = check((-10, -2), (-1, 50)).unwrap_err().to_string();
        assert!(
            err.contains("the root \"CN=root\" is not valid now"),
            "{err}"
        );

        // The intermediate served as if it were the root: refused.
        let (leaf, int, _root) = chain((-1, 100), (-1, 50), &key, &id);
        let err = verify_issued(
            &IssuedChain {
                chain_pem: vec![leaf],
                roots_pem: vec![int],
            },
            &key.public_key_der(),
            &id,
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is not self-signed"), "{err}");
    }

    #[test]
    fn self_signed_and_issued_by_are_read_from_the_certificates() {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let id = SpiffeId("spiffe://td/ns/a/sa/b".into());
        let (leaf, int, root) = chain((-1, 100), (-1, 50), &key, &id);
        assert!(is_self_signed(&root));
        assert!(!is_self_signed(&int) && !is_self_signed(&leaf));
        assert!(is_issued_by(&int, &root) && is_issued_by(&leaf, &int));
        assert!(!is_issued_by(&leaf, &root) && !is_issued_by(&root, &int));
        let (_, other_int, other_root) = chain((-1, 100), (-1, 50), &key, &id);
        assert!(!is_issued_by(&int, &other_root), "same names, another key");
        assert!(!is_issued_by(&other_int, &root));
        let (subject, _, not_after) = cert_summary(&root).unwrap();
        assert_eq!(subject, "CN=root");
        assert!(not_after > SystemTime::now());
    }
}

//! Tests of keys, CSRs and the checks of issued chains.

use std::time::SystemTime;

use rcgen::{CertificateParams, KeyPair};
use x509_parser::prelude::*;

use super::*;
use crate::identity::SpiffeId;

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
        split_pem_certs("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err()
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
    let (root_pem, root_key, root_params) = ca_cert("root", None, root_validity.0, root_validity.1);
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let (int_pem, int_key, int_params) = ca_cert(
        "intermediate",
        Some(&root_issuer),
        int_validity.0,
        int_validity.1,
    );
    let int_issuer = rcgen::Issuer::new(int_params, int_key);
    let csr =
        rcgen::CertificateSigningRequestParams::from_pem(&leaf_key.csr_pem(id).unwrap()).unwrap();
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
    // A leaf's signature, once verified with a key, is not taken as
    // verified with another key of the same name.
    assert!(is_issued_by(&leaf, &int) && !is_issued_by(&leaf, &other_int));
    let (subject, _, not_after) = cert_summary(&root).unwrap();
    assert_eq!(subject, "CN=root");
    assert!(not_after > SystemTime::now());
}

#[test]
fn a_leaf_that_could_sign_certificates_is_refused_and_other_svid_breaches_are_returned() {
    use rcgen::KeyUsagePurpose as Ku;
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let id = SpiffeId("spiffe://td/ns/a/sa/b".into());
    let (root_pem, root_key, root_params) = ca_cert("root", None, -1, 100);
    let root = rcgen::Issuer::new(root_params, root_key);
    let issue = |is_ca: rcgen::IsCa, usages: Vec<Ku>| {
        let mut csr =
            rcgen::CertificateSigningRequestParams::from_pem(&key.csr_pem(&id).unwrap()).unwrap();
        csr.params.is_ca = is_ca;
        csr.params.key_usages = usages;
        let chain = IssuedChain {
            chain_pem: vec![csr.signed_by(&root).unwrap().pem()],
            roots_pem: vec![root_pem.clone()],
        };
        verify_issued(&chain, &key.public_key_der(), &id, SystemTime::now())
    };

    let ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let err = issue(ca, vec![Ku::DigitalSignature]).unwrap_err();
    assert!(
        matches!(&err, CryptoError::NotSvid(b) if b.len() == 1 && b[0].rule == SvidRule::NotCa),
        "{err:?}"
    );
    assert!(err.to_string().contains("cA=true"), "{err}");
    let err = issue(
        rcgen::IsCa::ExplicitNoCa,
        vec![Ku::DigitalSignature, Ku::KeyCertSign],
    )
    .unwrap_err();
    assert!(err.to_string().contains("keyCertSign"), "{err}");

    // keyEncipherment on an EC key: served, the breach returned with the facts.
    let leaf = issue(
        rcgen::IsCa::ExplicitNoCa,
        vec![Ku::DigitalSignature, Ku::KeyEncipherment],
    )
    .expect("served");
    let rules: Vec<SvidRule> = leaf.svid_breaches.iter().map(|b| b.rule).collect();
    assert_eq!(rules, [SvidRule::NoKeyEnciphermentOnEc]);
    let leaf = issue(rcgen::IsCa::ExplicitNoCa, vec![Ku::DigitalSignature]).unwrap();
    assert_eq!(leaf.svid_breaches, []);
}

//! One test per X.509-SVID rule, each on a leaf made to break that rule
//! alone, and one on a leaf that keeps them all.

use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::*;
use crate::crypto::{KeyType, PrivateKey};

const ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

fn uri(u: &str) -> SanType {
    SanType::URI(u.to_string().try_into().unwrap())
}

/// The parameters of a leaf that keeps every rule: one URI SAN, cA false,
/// keyUsage digitalSignature, server and client auth.
fn good_params() -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![uri(ID)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p
}

/// A leaf for a fresh key of `key_type`, made from [`good_params`] changed
/// by `edit`, signed by a throwaway CA; its breaches.
fn breaches_of(key_type: KeyType, edit: impl FnOnce(&mut CertificateParams)) -> Vec<Breach> {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "CA");
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = Issuer::new(ca, ca_key);
    let key = PrivateKey::generate(key_type).unwrap();
    let mut p = good_params();
    edit(&mut p);
    let pem = p.signed_by(key.key_pair(), &issuer).unwrap().pem();
    check_pem(&pem).unwrap()
}

fn rules(breaches: &[Breach]) -> Vec<SvidRule> {
    breaches.iter().map(|b| b.rule).collect()
}

/// `breaches` is exactly one breach of `rule`, refused or not as
/// `refused` says, whose message names `setting`.
fn assert_only(breaches: &[Breach], rule: SvidRule, refused: bool, setting: &str) {
    assert_eq!(rules(breaches), [rule], "{breaches:?}");
    assert_eq!(breaches[0].refused(), refused, "{:?}", breaches[0]);
    let shown = describe(breaches);
    assert!(shown.contains(setting), "{shown}");
}

#[test]
fn a_leaf_keeping_every_rule_breaks_none() {
    assert_eq!(breaches_of(KeyType::EcP256, |_| {}), []);
    assert_eq!(breaches_of(KeyType::Rsa2048, |_| {}), []);
}

#[test]
fn not_exactly_one_uri_san_is_refused() {
    let none = breaches_of(KeyType::EcP256, |p| {
        p.subject_alt_names = vec![SanType::DnsName("httpbin".try_into().unwrap())]
    });
    assert_only(&none, SvidRule::OneUriSan, true, "use_csr_sans");
    assert!(none[0].found.contains("0 URI SANs"), "{none:?}");
    let two = breaches_of(KeyType::EcP256, |p| {
        p.subject_alt_names
            .push(uri("spiffe://cluster.local/ns/default/sa/sleep"))
    });
    assert_only(&two, SvidRule::OneUriSan, true, "use_csr_sans");
    assert!(two[0].found.contains("2 URI SANs"), "{two:?}");
}

#[test]
fn a_missing_basic_constraints_is_warned() {
    let b = breaches_of(KeyType::EcP256, |p| p.is_ca = IsCa::NoCa);
    assert_only(
        &b,
        SvidRule::BasicConstraints,
        false,
        "basic_constraints_valid_for_non_ca=true",
    );
}

#[test]
fn a_ca_leaf_is_refused() {
    let b = breaches_of(KeyType::EcP256, |p| {
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    });
    assert_only(&b, SvidRule::NotCa, true, "VAULT_SIGN_CSR_PATH");
}

#[test]
fn a_key_usage_without_digital_signature_is_warned() {
    let other = breaches_of(KeyType::EcP256, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyAgreement]
    });
    assert_only(&other, SvidRule::DigitalSignature, false, "key_usage");
    // No keyUsage extension at all (a Vault role with key_usage=[]).
    let absent = breaches_of(KeyType::EcP256, |p| p.key_usages = vec![]);
    assert_only(&absent, SvidRule::DigitalSignature, false, "key_usage");
}

#[test]
fn key_cert_sign_is_refused() {
    let b = breaches_of(KeyType::EcP256, |p| {
        p.key_usages.push(KeyUsagePurpose::KeyCertSign)
    });
    assert_only(&b, SvidRule::NoKeyCertSign, true, "key_usage");
}

#[test]
fn crl_sign_is_warned() {
    let b = breaches_of(KeyType::EcP256, |p| {
        p.key_usages.push(KeyUsagePurpose::CrlSign)
    });
    assert_only(&b, SvidRule::NoCrlSign, false, "key_usage");
}

#[test]
fn key_encipherment_is_warned_on_an_ec_key_and_allowed_on_rsa() {
    let with_ke = |p: &mut CertificateParams| p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    let ec = breaches_of(KeyType::EcP256, with_ke);
    assert_only(
        &ec,
        SvidRule::NoKeyEnciphermentOnEc,
        false,
        "key_usage=[\"DigitalSignature\"]",
    );
    // An RSA key can encipher a key (TLS 1.2's RSA key exchange): the bit
    // is allowed there.
    assert_eq!(breaches_of(KeyType::Rsa2048, with_ke), []);
}

//! Property tests of how the agent reads a Vault sign answer
//! (`chain_from_sign_answer`) and checks what it would serve
//! (`verify_issued`): whatever Vault (or something posing as it) answers,
//! the agent gets a chain or an error saying what is wrong, never a panic.
//! The raw answers (login, sign, issuer list) are fuzzed from their text in
//! src/ca/vault/answer_props.rs.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine;
use node_agent::ca::local::LocalCa;
use node_agent::ca::vault::chain_from_sign_answer;
use node_agent::crypto::{split_pem_certs, verify_issued, KeyType, PrivateKey};
use node_agent::identity::SpiffeId;
use proptest::prelude::*;

struct Real {
    root: String,
    leaf: String,
    key: PrivateKey,
    id: SpiffeId,
}

/// A genuine root and leaf, to mix with garbage.
fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let ca = LocalCa::new(None, "cluster.local").unwrap();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let id = SpiffeId("spiffe://cluster.local/ns/a/sa/b".into());
        let leaf = ca
            .sign_csr(&key.csr_pem(&id).unwrap(), Duration::from_secs(600))
            .unwrap();
        Real {
            root: ca.root_pem().to_string(),
            leaf,
            key,
            id,
        }
    })
}

/// Text Vault might send where a PEM goes: garbage, PEM armour around
/// garbage, a real certificate cut or flipped, or real certificates.
fn pem_ish() -> impl Strategy<Value = String> {
    let r = real();
    prop_oneof![
        "\\PC{0,100}",
        prop::collection::vec(any::<u8>(), 0..400).prop_map(|der| {
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                base64::engine::general_purpose::STANDARD.encode(der)
            )
        }),
        (0..r.leaf.len()).prop_map(move |n| r.leaf[..n].to_string()),
        (0..r.root.len(), any::<u8>()).prop_map(move |(i, b)| {
            let mut bytes = r.root.clone().into_bytes();
            bytes[i] = b'A' + b % 26;
            String::from_utf8(bytes).unwrap()
        }),
        Just(r.leaf.clone()),
        Just(r.root.clone()),
        Just(format!("{}{}", r.leaf, r.root)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any answer: a chain starting with a certificate, or an error that
    /// names what is missing or malformed.
    #[test]
    fn any_sign_answer_gets_a_chain_or_an_error(
        certificate in pem_ish(),
        issuing_ca in prop::option::of(pem_ish()),
        ca_chain in prop::option::of(prop::collection::vec(pem_ish(), 0..4)),
    ) {
        match chain_from_sign_answer(&certificate, issuing_ca.as_deref(), ca_chain.as_deref()) {
            Ok(chain) => {
                prop_assert!(!chain.chain_pem.is_empty());
                // What the agent would then check before serving: never a
                // panic, and only the genuine leaf for our key passes.
                let r = real();
                let checked = verify_issued(&chain, &r.key.public_key_der(), &r.id, SystemTime::now());
                if checked.is_ok() {
                    prop_assert_eq!(&chain.chain_pem[0], &split_pem_certs(&r.leaf).unwrap()[0]);
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

#[test]
fn the_genuine_answer_passes() {
    let r = real();
    let chain = chain_from_sign_answer(&r.leaf, Some(&r.root), None).unwrap();
    verify_issued(&chain, &r.key.public_key_der(), &r.id, SystemTime::now()).unwrap();
}

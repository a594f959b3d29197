use super::*;
use crate::crypto::{KeyType, PrivateKey};

/// A self-signed CA certificate on a fresh key of `key_type`, DER.
fn root(key_type: KeyType) -> Vec<u8> {
    let key = PrivateKey::generate(key_type).unwrap();
    let kp = rcgen::KeyPair::from_pem(key.pkcs8_pem()).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&kp).unwrap().der().to_vec()
}

fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn trust_domain_names_follow_the_spiffe_rules() {
    assert_eq!(
        TrustDomain::parse("other.example").unwrap().as_str(),
        "other.example"
    );
    let td = TrustDomain::parse("spiffe://a-b_c.9").unwrap();
    assert_eq!(
        (td.as_str(), td.id()),
        ("a-b_c.9", "spiffe://a-b_c.9".into())
    );
    for bad in [
        "",
        "Other.example",
        "a/b",
        "spiffe://",
        "a b",
        &"x".repeat(256),
    ] {
        assert!(TrustDomain::parse(bad).is_err(), "{bad:?}");
    }
    assert!(
        TrustDomain::parse(&"y".repeat(10_000))
            .unwrap_err()
            .to_string()
            .len()
            < 300
    );
}

#[test]
fn what_is_written_reads_back_for_ec_and_rsa_roots() {
    let roots = vec![
        root(KeyType::EcP256),
        root(KeyType::EcP384),
        root(KeyType::Rsa2048),
    ];
    let text = to_json(&roots, 7, Duration::from_secs(300)).unwrap();
    let back = parse(text.as_bytes()).unwrap();
    assert_eq!(back.roots, roots);
    assert_eq!(back.sequence, Some(7));
    assert_eq!(back.refresh_hint, Some(Duration::from_secs(300)));
    assert_eq!(back.pems().len(), 3);

    // Field by field, as the specification writes them.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(keys[0]["x"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );
    assert_eq!(keys[1]["crv"], "P-384");
    assert_eq!(keys[2]["kty"], "RSA");
    assert_eq!(keys[2]["e"], "AQAB");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(keys[2]["n"].as_str().unwrap())
            .unwrap()
            .len(),
        256
    );
    for k in keys {
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["x5c"].as_array().unwrap().len(), 1);
    }
}

#[test]
fn other_uses_are_skipped_and_bad_keys_refuse_the_bundle() {
    let der = root(KeyType::EcP256);
    let good: serde_json::Value = serde_json::from_str(
        &to_json(std::slice::from_ref(&der), 1, Duration::from_secs(60)).unwrap(),
    )
    .unwrap();
    let key = good["keys"][0].clone();

    // A jwt-svid key and a key of unknown use are skipped.
    let mixed = json(serde_json::json!({"keys": [
        {"use": "jwt-svid", "kty": "EC", "kid": "k", "crv": "P-256", "x": "AA", "y": "AA"},
        {"use": "something-new", "kty": "oct"},
        key,
    ]}));
    let b = parse(&mixed).unwrap();
    assert_eq!(
        (b.roots, b.sequence, b.refresh_hint),
        (vec![der.clone()], None, None)
    );

    // No root at all.
    let only_jwt = json(serde_json::json!({"keys": [{"use": "jwt-svid", "kty": "EC"}]}));
    assert_eq!(parse(&only_jwt), Err(BundleError::NoRoots));
    assert_eq!(parse(br#"{"keys": []}"#), Err(BundleError::NoRoots));

    // Two certificates in one x509-svid key.
    let mut two = key.clone();
    two["x5c"] = serde_json::json!([key["x5c"][0], key["x5c"][0]]);
    let e = parse(&json(serde_json::json!({"keys": [two]}))).unwrap_err();
    assert!(e.to_string().contains("exactly one"), "{e}");

    // Key parameters that are not the certificate's.
    let mut wrong = key.clone();
    wrong["x"] = good["keys"][0]["y"].clone();
    let e = parse(&json(serde_json::json!({"keys": [wrong]}))).unwrap_err();
    assert!(e.to_string().contains("not the public key"), "{e}");

    // Not a certificate; not base64; not JSON.
    let mut garbage = key.clone();
    garbage["x5c"] = serde_json::json!([STANDARD.encode(b"hello")]);
    assert!(matches!(
        parse(&json(serde_json::json!({"keys": [garbage]}))),
        Err(BundleError::BadKey { index: 0, .. })
    ));
    let mut not_b64 = key;
    not_b64["x5c"] = serde_json::json!(["***"]);
    assert!(parse(&json(serde_json::json!({"keys": [not_b64]}))).is_err());
    assert!(matches!(parse(b"<html>"), Err(BundleError::NotJson(_))));
    assert!(matches!(parse(b"{}"), Err(BundleError::NotJson(_))));

    let many: Vec<_> = (0..MAX_KEYS + 1)
        .map(|_| serde_json::json!({"use": "jwt-svid"}))
        .collect();
    assert!(matches!(
        parse(&json(serde_json::json!({"keys": many}))),
        Err(BundleError::TooManyKeys { .. })
    ));
}

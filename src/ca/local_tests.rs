//! Tests of the local CA: what it issues, its root on disk, rotation.

use super::*;
use crate::crypto::verify_issued;
use crate::identity::SpiffeId;
use std::time::SystemTime;

#[tokio::test]
async fn issues_a_verifiable_leaf_for_the_csr() {
    let ca = LocalCa::new(None, "cluster.local").unwrap();
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let id = SpiffeId("spiffe://cluster.local/ns/a/sa/b".into());
    let chain = ca
        .sign(
            &Authorization::default(),
            &key.csr_pem(&id).unwrap(),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let info = verify_issued(&chain, &key.public_key_der(), &id, SystemTime::now()).unwrap();
    let life = info.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        life <= Duration::from_secs(600) && life > Duration::from_secs(590),
        "{life:?}"
    );

    // Another key's certificate, or another identity, is refused.
    let other = PrivateKey::generate(KeyType::EcP256).unwrap();
    assert!(verify_issued(&chain, &other.public_key_der(), &id, SystemTime::now()).is_err());
    let other_id = SpiffeId("spiffe://cluster.local/ns/a/sa/c".into());
    assert!(verify_issued(&chain, &key.public_key_der(), &other_id, SystemTime::now()).is_err());
    // A chain to a root it does not belong to is refused.
    let ca2 = LocalCa::new(None, "cluster.local").unwrap();
    let wrong_root = IssuedChain {
        chain_pem: chain.chain_pem.clone(),
        roots_pem: vec![ca2.root_pem().to_string()],
    };
    assert!(verify_issued(&wrong_root, &key.public_key_der(), &id, SystemTime::now()).is_err());
    // Expired is refused.
    let later = SystemTime::now() + Duration::from_secs(3600);
    assert!(verify_issued(&chain, &key.public_key_der(), &id, later).is_err());
}

/// The key usages of a certificate, by their RFC 5280 names.
fn usages(pem: &str) -> Vec<&'static str> {
    const NAMES: [&str; 9] = [
        "digitalSignature",
        "nonRepudiation",
        "keyEncipherment",
        "dataEncipherment",
        "keyAgreement",
        "keyCertSign",
        "cRLSign",
        "encipherOnly",
        "decipherOnly",
    ];
    let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1;
    let cert = der.parse_x509().unwrap();
    let flags = cert.key_usage().unwrap().expect("a keyUsage").value.flags;
    (0..NAMES.len())
        .filter(|i| flags & (1 << i) != 0)
        .map(|i| NAMES[i])
        .collect()
}

#[tokio::test]
async fn leaves_may_only_sign_and_the_root_only_certificates_and_crls() {
    let ca = LocalCa::new(None, "cluster.local").unwrap();
    assert_eq!(
        usages(ca.root_pem()),
        ["keyCertSign", "cRLSign"],
        "the root"
    );
    let id = SpiffeId("spiffe://cluster.local/ns/a/sa/b".into());
    for kt in [KeyType::EcP256, KeyType::Rsa2048] {
        let key = PrivateKey::generate(kt).unwrap();
        let chain = ca
            .sign(
                &Authorization::default(),
                &key.csr_pem(&id).unwrap(),
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        assert_eq!(
            usages(&chain.chain_pem[0]),
            ["digitalSignature"],
            "{kt} leaf"
        );
        let info = verify_issued(&chain, &key.public_key_der(), &id, SystemTime::now()).unwrap();
        assert_eq!(info.svid_breaches, [], "{kt}: a valid X509-SVID");
    }
}

#[test]
fn persists_and_reloads_the_root_with_a_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::new(Some(dir.path()), "cluster.local").unwrap();
    let mode = fs::metadata(dir.path().join(KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = LocalCa::new(Some(dir.path()), "cluster.local").unwrap();
    assert_eq!(ca.root_pem(), again.root_pem());

    fs::set_permissions(dir.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
    let err = LocalCa::new(Some(dir.path()), "cluster.local").unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");

    fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    assert!(LocalCa::new(Some(dir.path()), "cluster.local").is_err());
}

#[tokio::test]
async fn a_rotated_root_is_trusted_with_the_previous_one_until_that_expires() {
    let dir = tempfile::tempdir().unwrap();
    let first = LocalCa::new(Some(dir.path()), "cluster.local").unwrap();
    assert_eq!(first.trust_roots().await.unwrap(), [first.root_pem()]);

    LocalCa::rotate_dir(dir.path()).unwrap();
    let second = LocalCa::new(Some(dir.path()), "cluster.local").unwrap();
    assert_ne!(second.root_pem(), first.root_pem(), "a new root");
    assert_eq!(
        second.trust_roots().await.unwrap(),
        [second.root_pem(), first.root_pem()],
        "the new root, then the previous one"
    );
    // A leaf of the previous root still verifies against the roots served.
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let id = SpiffeId("spiffe://cluster.local/ns/a/sa/b".into());
    let old_leaf = first
        .sign_csr(&key.csr_pem(&id).unwrap(), Duration::from_secs(60))
        .unwrap();
    let old_chain = IssuedChain {
        chain_pem: vec![old_leaf],
        roots_pem: second.trust_roots().await.unwrap(),
    };
    verify_issued(&old_chain, &key.public_key_der(), &id, SystemTime::now()).unwrap();

    // Once the previous root has expired, only the current one is served.
    let expired = expired_root();
    fs::write(dir.path().join(PREVIOUS_CERT_FILE), &expired).unwrap();
    let third = LocalCa::new(Some(dir.path()), "cluster.local").unwrap();
    assert_eq!(third.trust_roots().await.unwrap(), [third.root_pem()]);

    // Something that is not a root is refused, naming the file.
    fs::write(
        dir.path().join(PREVIOUS_CERT_FILE),
        third
            .sign_csr(&key.csr_pem(&id).unwrap(), Duration::from_secs(60))
            .unwrap(),
    )
    .unwrap();
    let err = LocalCa::new(Some(dir.path()), "cluster.local").unwrap_err();
    assert!(err.to_string().contains(PREVIOUS_CERT_FILE), "{err}");
    // A directory without a root cannot be rotated.
    let empty = tempfile::tempdir().unwrap();
    assert!(LocalCa::rotate_dir(empty.path()).is_err());
}

fn expired_root() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "old root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(10);
    p.not_after = now - time::Duration::days(1);
    p.self_signed(&key).unwrap().pem()
}

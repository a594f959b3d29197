//! The writer's loop: the files of a federated trust domain appear, change
//! and go as the trust bundle's federated roots do, while the workload's own
//! files stay as they are.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::Clock;
use crate::crypto::KeyType;
use crate::secrets::test_support::{jwt, manager_and_trust, FakeCa};
use crate::secrets::ManagerOptions;
use crate::trust::spiffe_bundle::TrustDomain;
use crate::trust::Federated;

/// Waits (real time) until `f` holds; panics saying `what` after 20 s.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}");
}

#[tokio::test]
async fn federated_roots_files_follow_the_trust_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let token = dir.path().join("token");
    fs::write(&token, jwt("x", None).expose()).unwrap();
    let (manager, trust) = manager_and_trust(
        FakeCa::new(Clock::system()),
        ManagerOptions::new("td", KeyType::EcP256, Duration::from_secs(3600)),
    );
    let (stop, shutdown) = watch::channel(false);
    let writer = tokio::spawn(run(out.clone(), manager, token, shutdown));
    let read = |name: &str| fs::read_to_string(out.join(name)).ok();
    until("the certificate files", || read(ROOT_CERT).is_some()).await;
    let (chain, roots) = (read(CERT_CHAIN), read(ROOT_CERT));
    let other = out.join("root-cert-other.example.pem");
    assert!(!other.exists());

    let federate = |list: &[(&str, &str)]| {
        trust.set_federated(Arc::new(
            list.iter()
                .map(|(td, pem)| (TrustDomain::parse(td).unwrap(), vec![pem.to_string()]))
                .collect::<Federated>(),
        ))
    };
    federate(&[("other.example", "A\n")]);
    until("other.example's file", || {
        read("root-cert-other.example.pem").as_deref() == Some("A\n")
    })
    .await;

    federate(&[("other.example", "B\n"), ("third.example", "C\n")]);
    until("other.example's new roots and third.example's", || {
        read("root-cert-other.example.pem").as_deref() == Some("B\n")
            && read("root-cert-third.example.pem").as_deref() == Some("C\n")
    })
    .await;

    federate(&[("third.example", "C\n")]);
    // Gone, not left dangling.
    until("other.example's file removed", || {
        fs::symlink_metadata(&other).is_err()
    })
    .await;
    assert_eq!(read("root-cert-third.example.pem").as_deref(), Some("C\n"));
    assert_eq!(
        (read(CERT_CHAIN), read(ROOT_CERT)),
        (chain, roots),
        "unchanged"
    );

    stop.send(true).unwrap();
    writer.await.unwrap();
}

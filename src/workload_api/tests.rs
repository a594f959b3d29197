//! The Workload API in process, read by a third-party client (the crates.io
//! `spiffe` crate): a federated trust domain published in the trust bundle
//! reaches an open `FetchX509SVID` stream (as a federated bundle) and
//! `FetchX509Bundles`, beside the workload's own trust domain.

use std::sync::Arc;
use std::time::Duration;

use spiffe::{TrustDomain as SpiffeTd, WorkloadApiClient};
use tokio::sync::watch;

use crate::endpoint::credential::TokenFile;
use tokio_stream::StreamExt;

use super::WorkloadApiService;
use crate::clock::Clock;
use crate::config::SdsLimits;
use crate::crypto::KeyType;
use crate::endpoint::limits::Limits;
use crate::endpoint::Endpoint;
use crate::secrets::test_support::{jwt, manager_and_trust, FakeCa, TestRoot};
use crate::secrets::ManagerOptions;
use crate::trust::spiffe_bundle::TrustDomain;
use crate::trust::Federated;

/// The DER of the one certificate in `pem`.
fn der(pem: &str) -> Vec<u8> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .contents
}

#[tokio::test]
async fn spiffe_client_sees_a_federated_trust_domain_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, jwt("x", None).expose()).unwrap();
    let clock = Clock::system();
    let ca = FakeCa::new(clock);
    let (manager, trust) = manager_and_trust(
        ca.clone(),
        ManagerOptions::new("td", KeyType::EcP256, Duration::from_secs(3600)),
    );
    let socket = dir.path().join("api.sock");
    let listener = crate::endpoint::socket::bind(&socket, Default::default()).unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let endpoint = Endpoint::new(Limits::new(SdsLimits::default()), None, shutdown);
    let service = Arc::new(WorkloadApiService {
        manager,
        token_file: Some(TokenFile::new(token)),
        endpoint: endpoint.clone(),
    });
    tokio::spawn(async move { crate::endpoint::serve(listener, service, &endpoint).await });

    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap();
    let (own, other) = (
        SpiffeTd::new("td").unwrap(),
        SpiffeTd::new("other.example").unwrap(),
    );
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("a first context")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://td/ns/ns/sa/x"
    );
    assert!(first.bundle_set().get(&own).is_some());
    assert!(first.bundle_set().get(&other).is_none());

    let foreign = TestRoot::new(&clock, "other.example root", Duration::from_secs(86400)).pem;
    trust.set_federated(Arc::new(Federated::from([(
        TrustDomain::parse("other.example").unwrap(),
        vec![foreign.clone()],
    )])));
    let pushed = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("the federated change pushed on the open stream")
        .unwrap()
        .unwrap();
    let bundle = pushed
        .bundle_set()
        .get(&other)
        .expect("other.example's bundle");
    let authorities: Vec<&[u8]> = bundle.authorities().iter().map(|a| a.as_bytes()).collect();
    assert_eq!(authorities, [der(&foreign).as_slice()]);
    assert_eq!(
        pushed.bundle_set().get(&own).unwrap().authorities(),
        first.bundle_set().get(&own).unwrap().authorities(),
        "the own bundle as it was"
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&own).is_some());
    assert_eq!(
        bundles.get(&other).unwrap().authorities()[0].as_bytes(),
        der(&foreign).as_slice()
    );
}

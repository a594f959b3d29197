//! Federation against bundle endpoints that misbehave: every bad answer is
//! refused with a log line that says why, the last good bundle stays
//! served, and `/metrics` shows that the bundle is not fresh.

use crate::support;

use std::time::{Duration, Instant};

use node_agent::trust::spiffe_bundle::to_json;
use support::agent::Agent;
use support::bundle_server::BundleServer;
use support::metrics::scrape;
use support::sds_client::{connect, fake_jwt, fetch, secrets};

const TD: &str = "bad.example";

/// A self-signed CA certificate, DER, with `uri` as URI SAN if given.
fn root(uri: Option<&str>) -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "bad.example test root");
    if let Some(u) = uri {
        p.subject_alt_names = vec![rcgen::SanType::URI(u.try_into().unwrap())];
    }
    p.self_signed(&kp).unwrap().der().to_vec()
}

fn bundle(roots: &[Vec<u8>]) -> Vec<u8> {
    to_json(roots, 1, Duration::from_secs(1))
        .unwrap()
        .into_bytes()
}

/// The served roots and freshness of `bad.example`, from `/metrics`.
async fn state(agent: &Agent) -> (f64, f64) {
    let m = scrape(&agent.status_url("/metrics"), "prometheus").await;
    let td = [("trust_domain", TD)];
    (
        m.get("node_agent_federation_bundle_roots", &td),
        m.get("node_agent_federation_bundle_fresh", &td),
    )
}

/// What `ALL` serves for `bad.example` (PEM), asked over SDS.
async fn served_all(agent: &Agent) -> String {
    let mut c = connect(&agent.socket).await;
    let resp = fetch(&mut c, &["ALL"], &fake_jwt("default", "sleep"))
        .await
        .unwrap();
    let domains = node_agent::client::sds::trust_domains(&secrets(&resp)[0]).unwrap();
    domains
        .into_iter()
        .find(|(td, _)| td == TD)
        .map(|(_, pem)| pem)
        .unwrap_or_default()
}

/// Waits until the endpoint has been read twice more (the answer set
/// before was read at least once in full).
async fn read_twice(server: &BundleServer, agent: &Agent) {
    let target = server.requests() + 2;
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.requests() < target {
        assert!(
            Instant::now() < deadline,
            "the agent stopped reading the endpoint; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoint_answers_are_refused_and_the_last_good_bundle_stays() {
    let dir = tempfile::tempdir().unwrap();
    let good = root(None);
    let server = BundleServer::start(200, bundle(std::slice::from_ref(&good))).await;
    let ca_file = dir.path().join("endpoint-ca.pem");
    std::fs::write(&ca_file, &server.ca_pem).unwrap();
    let config = dir.path().join("federation.json");
    std::fs::write(
        &config,
        serde_json::json!({"trust_domains": {TD: {
            "bundle_endpoint_url": server.url,
            "bundle_endpoint_profile": "https_web",
            "ca_file": ca_file,
        }}})
        .to_string(),
    )
    .unwrap();
    let agent = Agent::started(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("FEDERATION_CONFIG", config.display().to_string()),
        ("FEDERATION_REFRESH_MIN", "1s".into()),
        ("FEDERATION_MAX_BUNDLE_BYTES", "4096".into()),
    ])
    .await;

    // Positive control: the good bundle is read, logged and served.
    agent
        .log_shows(
            "federation: added a root of bad.example",
            Duration::from_secs(20),
        )
        .await;
    assert!(
        agent.log().contains("bad.example test root"),
        "{}",
        agent.log()
    );
    read_twice(&server, &agent).await;
    assert_eq!(state(&agent).await, (1.0, 1.0));
    let good_pem = node_agent::crypto::der_to_pem(&good);
    assert_eq!(served_all(&agent).await, good_pem);

    let mut big = bundle(std::slice::from_ref(&good));
    big.resize(5000, b' ');
    for (status, body, says) in [
        (
            200,
            big,
            "larger than 4096 bytes (FEDERATION_MAX_BUNDLE_BYTES)",
        ),
        (
            200,
            bundle(&[root(Some("spiffe://cluster.local"))]),
            "names the trust domain \"cluster.local\"",
        ),
        (200, b"<html>garbage</html>".to_vec(), "not a SPIFFE bundle"),
        (200, br#"{"keys": []}"#.to_vec(), "holds no x509-svid root"),
        (503, b"down for maintenance".to_vec(), "answered HTTP 503"),
    ] {
        server.answer(status, body);
        read_twice(&server, &agent).await;
        let log = agent.log();
        assert!(log.contains(says), "no {says:?} in the log:\n{log}");
        assert!(
            log.contains("keeping its last good bundle (1 roots)"),
            "{log}"
        );
        assert_eq!(state(&agent).await, (1.0, 0.0), "after {says}");
        assert_eq!(served_all(&agent).await, good_pem, "after {says}");
    }
    assert!(
        !agent.log().contains("federation: removed a root"),
        "{}",
        agent.log()
    );

    // The endpoint gone altogether: the same.
    drop(server);
    agent
        .log_shows(
            "cannot read the bundle of bad.example",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(state(&agent).await, (1.0, 0.0));
}

//! The trust bundle's failure modes and extras: Vault down during refreshes
//! keeps the bundle and pushes nothing; an extra roots file is served, and a
//! change to it pushed; an unreadable one stops the agent naming the setting.

use crate::support;

use std::path::Path;
use std::time::Duration;

use support::agent::Agent;
use support::bao::ProxyMode;
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tokio_stream::StreamExt;

use super::{new_root, serial_of};

/// Opens a `ROOTCA` stream and returns it with the roots (serials) of its
/// first response, ACKed.
async fn rootca_stream(
    socket: &Path,
    jwt: &str,
) -> (
    tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
    Vec<String>,
) {
    let mut client = connect(socket).await;
    let (tx, mut inbound) = open_stream(&mut client, jwt).await;
    tx.send(request(&["ROOTCA"], None)).await.unwrap();
    let first = inbound.next().await.unwrap().unwrap();
    tx.send(request(&["ROOTCA"], Some(&first))).await.unwrap();
    let roots = roots_of(&first);
    (tx, inbound, roots)
}

/// The serials of the roots a `ROOTCA` response carries.
fn roots_of(
    resp: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<String> {
    let pem = trusted_ca(&secrets(resp)[0]);
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|b| {
            let b = b.unwrap();
            b.parse_x509()
                .unwrap()
                .raw_serial_as_string()
                .replace(':', "")
                .to_lowercase()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_during_refreshes_keeps_the_bundle_and_pushes_nothing() {
    let env = VaultEnv::start().await.with_proxy(ProxyMode::Up).await;
    let agent = Agent::started(&env.agent_env_with(&[("TRUST_REFRESH_INTERVAL", "1s")])).await;
    let old_root = serial_of(&env.setup.root_pem);
    let (_tx, mut inbound, roots) =
        rootca_stream(&agent.socket, &env.jwt("default", "httpbin")).await;
    assert_eq!(roots, std::slice::from_ref(&old_root));
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    // A second root, in no certificate's chain: served because the mount
    // lists it (this also shows that refreshes reach the stream).
    let (_, next_pem) = new_root(&env).await;
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(15),
        "the mount's new root was not pushed",
        || agent.log(),
    )
    .await
    .unwrap();
    let both = sorted(vec![old_root.clone(), serial_of(&next_pem)]);
    assert_eq!(sorted(roots_of(&pushed)), both);

    // Vault away for several refreshes: nothing is dropped, nothing pushed.
    env.proxy.as_ref().unwrap().set_up(false).await;
    agent
        .log_shows("cannot read the CA's roots", Duration::from_secs(10))
        .await;
    let quiet = tokio::time::timeout(Duration::from_secs(4), inbound.next()).await;
    assert!(quiet.is_err(), "pushed while Vault was away: {quiet:?}");
    assert!(
        agent
            .log()
            .contains("keeping the 2 root(s) of the trust bundle (ROOTCA)"),
        "{}",
        agent.log()
    );

    // Vault back with a third root: pushed with the other two.
    env.proxy.as_ref().unwrap().set_up(true).await;
    let (_, third_pem) = new_root(&env).await;
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(15),
        "no push after Vault came back with a new root",
        || agent.log(),
    )
    .await
    .unwrap();
    let mut all = both;
    all.push(serial_of(&third_pem));
    assert_eq!(sorted(roots_of(&pushed)), sorted(all));
}

/// A self-signed CA certificate, PEM.
fn extra_root(name: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[tokio::test]
async fn an_extra_roots_file_is_served_and_a_change_to_it_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("extra-roots.pem");
    let (x, y) = (extra_root("extra x"), extra_root("extra y"));
    std::fs::write(&file, &x).unwrap();
    let agent = Agent::started(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("TRUST_EXTRA_ROOTS", file.display().to_string()),
    ])
    .await;
    let (_tx, mut inbound, roots) =
        rootca_stream(&agent.socket, &fake_jwt("default", "httpbin")).await;
    assert_eq!(roots.len(), 2, "the local CA's root and the extra one");
    assert!(roots.contains(&serial_of(&x)), "{roots:?}");

    std::fs::write(&file, &y).unwrap();
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(15),
        "the changed file was not pushed",
        || agent.log(),
    )
    .await
    .unwrap();
    let roots = roots_of(&pushed);
    assert_eq!(roots.len(), 2, "{roots:?}");
    assert!(roots.contains(&serial_of(&y)), "{roots:?}");
    assert!(
        !roots.contains(&serial_of(&x)),
        "removed from the file: gone"
    );
    let log = agent.log();
    assert!(
        log.contains("trust bundle (ROOTCA): added root (in TRUST_EXTRA_ROOTS)")
            && log.contains("CN=extra y"),
        "{log}"
    );
    assert!(
        log.contains("removed root: it was removed from TRUST_EXTRA_ROOTS"),
        "{log}"
    );
}

#[tokio::test]
async fn an_unreadable_extra_roots_file_stops_the_agent_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(
        &dir.path().join("sock"),
        dir.path(),
        &[
            ("CA_PROVIDER", "LocalCA".into()),
            ("TRUST_EXTRA_ROOTS", "/nonexistent/roots.pem".into()),
        ],
    );
    let status = agent.exited(Duration::from_secs(20)).await;
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("TRUST_EXTRA_ROOTS /nonexistent/roots.pem: cannot read"),
        "{log}"
    );
}

//! `ALL`: every trust domain the workload trusts, this mesh's (named from
//! the workload's SPIFFE ID, with `ROOTCA`'s roots) and each federated one,
//! in Envoy's SPIFFE validator config; a change of the federated roots is
//! pushed on `ALL` and on nothing else, since `ROOTCA`'s content and version
//! stay the same.

use std::sync::Arc;

use super::*;
use crate::secrets::test_support::TestRoot;
use crate::trust::spiffe_bundle::TrustDomain;
use crate::trust::Federated;

/// The trust domains (name, roots PEM) of an `ALL` secret.
fn domains(s: &Secret) -> Vec<(String, String)> {
    crate::client::sds::trust_domains(s).expect("a SPIFFE validator config")
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, p)| (n.to_string(), p.to_string()))
        .collect()
}

/// A foreign trust domain's root, as the federation fetcher publishes it.
fn foreign_root(agent: &Agent, name: &str) -> String {
    TestRoot::new(&agent.clock, name, Duration::from_secs(10 * 365 * 86400)).pem
}

fn federate(agent: &Agent, domains: &[(&str, &str)]) {
    agent.trust.set_federated(Arc::new(
        domains
            .iter()
            .map(|(td, pem)| (TrustDomain::parse(td).unwrap(), vec![pem.to_string()]))
            .collect::<Federated>(),
    ));
}

/// The CA lists a second root: this mesh's roots (`ROOTCA`) change at the
/// next refresh of the trust bundle.
async fn rootca_changes(agent: &Agent) -> String {
    let new = agent.ca.add_root(Duration::from_secs(20 * 365 * 86400));
    agent.ca.set_listing(Ok(vec![0, new]));
    tokio::time::advance(crate::trust::TrustOptions::default().refresh).await;
    agent.ca.root_pem(new)
}

#[tokio::test(start_paused = true)]
async fn all_serves_every_trust_domain_and_a_federated_change_reaches_only_all() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let mut all = open_sotw(&mut client, &x).await.unwrap();
    let mut plain = open_sotw(&mut client, &x).await.unwrap();
    plain.send(request(&["default", "ROOTCA"], None)).await;
    let first_plain = plain.response().await;
    let rootca = trusted_ca(&secret_named(&first_plain, "ROOTCA"));
    all.send(request(&["ALL"], None)).await;
    let first = all.response().await;
    assert_eq!(names(&first), ["ALL"]);
    // Nothing federated: this mesh's trust domain alone, with ROOTCA's roots.
    assert_eq!(
        domains(&secret_named(&first, "ALL")),
        pairs(&[("td", &rootca)])
    );
    all.send(request(&["ALL"], Some(&first))).await;
    plain
        .send(request(&["default", "ROOTCA"], Some(&first_plain)))
        .await;

    // A federated trust domain: pushed on ALL, beside the own one, sorted.
    let other = foreign_root(&agent, "other.example root");
    federate(&agent, &[("other.example", &other)]);
    let pushed = all.response().await;
    assert_eq!(
        domains(&secret_named(&pushed, "ALL")),
        pairs(&[("other.example", &other), ("td", &rootca)])
    );
    assert_ne!(pushed.version_info, first.version_info);
    all.send(request(&["ALL"], Some(&pushed))).await;
    // ... and nothing on the stream of default and ROOTCA.
    plain
        .silent(QUIET, "a federated change on [default, ROOTCA]")
        .await;

    // Another domain added, the first one's roots replaced.
    let other2 = foreign_root(&agent, "other.example root 2");
    let zeta = foreign_root(&agent, "zeta.example root");
    federate(
        &agent,
        &[("zeta.example", &zeta), ("other.example", &other2)],
    );
    let pushed = all.response().await;
    assert_eq!(
        domains(&secret_named(&pushed, "ALL")),
        pairs(&[
            ("other.example", &other2),
            ("td", &rootca),
            ("zeta.example", &zeta)
        ])
    );
    all.send(request(&["ALL"], Some(&pushed))).await;
    plain.silent(QUIET, "a second federated change").await;

    // Positive control: a change of this mesh's roots reaches both streams.
    let new_root = rootca_changes(&agent).await;
    let plain_push = plain.response().await;
    let new_rootca = trusted_ca(&secret_named(&plain_push, "ROOTCA"));
    assert!(new_rootca.contains(&new_root), "{new_rootca}");
    assert_eq!(serial(&plain_push), serial(&first_plain), "no renewal");
    let pushed = all.response().await;
    assert_eq!(
        domains(&secret_named(&pushed, "ALL")),
        pairs(&[
            ("other.example", &other2),
            ("td", &new_rootca),
            ("zeta.example", &zeta)
        ])
    );
    all.send(request(&["ALL"], Some(&pushed))).await;
    plain
        .send(request(&["default", "ROOTCA"], Some(&plain_push)))
        .await;

    // Federation ends: ALL is back to the own domain; ROOTCA unmoved.
    federate(&agent, &[]);
    let pushed = all.response().await;
    assert_eq!(
        domains(&secret_named(&pushed, "ALL")),
        pairs(&[("td", &new_rootca)])
    );
    plain.silent(QUIET, "federation ending").await;
}

#[tokio::test(start_paused = true)]
async fn delta_pushes_all_alone_on_a_federated_change() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let mut every = open_delta(&mut client, &x).await.unwrap();
    let mut plain = open_delta(&mut client, &x).await.unwrap();
    every
        .send(delta_request(&["default", "ROOTCA", "ALL"], ""))
        .await;
    let first = every.response().await;
    assert_eq!(delta_names(&first), ["default", "ROOTCA", "ALL"]);
    let rootca = trusted_ca(&delta_secret_named(&first, "ROOTCA"));
    assert_eq!(
        domains(&delta_secret_named(&first, "ALL")),
        pairs(&[("td", &rootca)])
    );
    plain.send(delta_request(&["default", "ROOTCA"], "")).await;
    let first_plain = plain.response().await;
    every.send(delta_request(&[], &first.nonce)).await;
    plain.send(delta_request(&[], &first_plain.nonce)).await;

    let other = foreign_root(&agent, "other.example root");
    federate(&agent, &[("other.example", &other)]);
    // Only ALL changed: the response carries it alone, with a new version.
    let pushed = every.response().await;
    assert_eq!(delta_names(&pushed), ["ALL"]);
    assert_eq!(
        domains(&delta_secret_named(&pushed, "ALL")),
        pairs(&[("other.example", &other), ("td", &rootca)])
    );
    let version = |r: &DeltaDiscoveryResponse, n: &str| {
        r.resources
            .iter()
            .find(|x| x.name == n)
            .map(|x| x.version.clone())
            .unwrap()
    };
    assert_ne!(version(&pushed, "ALL"), version(&first, "ALL"));
    every.send(delta_request(&[], &pushed.nonce)).await;
    plain
        .silent(QUIET, "a federated change on [default, ROOTCA]")
        .await;

    // Positive control: this mesh's roots change; ROOTCA and ALL move, on
    // both streams as subscribed.
    let new_root = rootca_changes(&agent).await;
    let plain_push = plain.response().await;
    assert_eq!(delta_names(&plain_push), ["ROOTCA"]);
    assert!(trusted_ca(&delta_secret_named(&plain_push, "ROOTCA")).contains(&new_root));
    let pushed = every.response().await;
    assert_eq!(delta_names(&pushed), ["ROOTCA", "ALL"]);
}

//! The SPIFFE Workload API (`WORKLOAD_API_SOCKET`) seen by two third-party
//! clients, the crates.io `spiffe` crate and py-spiffe (PyPI `spiffe`): an
//! SVID whose SPIFFE ID and chain verify against the bundle, from the same
//! cache as SDS; rotations and root changes pushed on the open stream; and
//! the documented errors without the header, without a token file, and for
//! the JWT-SVID methods.
//!
//! [`clients`] holds the two clients' runs, [`refusals`] the errors and the
//! bounds, [`root_change`] a Vault root change reaching the open stream and
//! the files; this file, the agent they run and the SVID check they share.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::PublicKeyData;
use spiffe::{TrustDomain, X509BundleSet, X509Svid};
use support::agent::Agent;
use support::sds_client::fake_jwt;
use x509_parser::prelude::*;

mod clients;
mod refusals;
mod root_change;

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

/// An agent in one-workload mode (token file) serving the Workload API, or
/// without a token file when `token` is false.
struct ApiAgent {
    agent: Agent,
    api_socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn api_agent(token: bool, extra: &[(&'static str, String)]) -> ApiAgent {
    let dir = tempfile::tempdir().unwrap();
    let api_socket = dir.path().join("workload-api").join("socket");
    let mut env = vec![
        ("CA_PROVIDER", "LocalCA".to_string()),
        ("WORKLOAD_API_SOCKET", api_socket.display().to_string()),
    ];
    if token {
        let path = dir.path().join("token");
        std::fs::write(&path, fake_jwt("default", "httpbin")).unwrap();
        env.push(("WORKLOAD_TOKEN_PATH", path.display().to_string()));
    }
    env.extend(extra.iter().cloned());
    let agent = Agent::start_at(&dir.path().join("sds").join("uds_path"), dir.path(), &env);
    agent.wait_log("SPIFFE Workload API server start", Duration::from_secs(10));
    ApiAgent {
        agent,
        api_socket,
        _dir: dir,
    }
}

fn endpoint(socket: &Path) -> String {
    format!("unix:{}", socket.display())
}

/// The SVID names `SPIFFE_ID`, its key is its leaf's, and its chain verifies
/// up to a self-signed authority of its trust domain's bundle. Returns the
/// leaf serial.
fn verify(svid: &X509Svid, bundles: &X509BundleSet) -> String {
    assert_eq!(svid.spiffe_id().to_string(), SPIFFE_ID);
    let chain: Vec<X509Certificate> = svid
        .cert_chain()
        .iter()
        .map(|c| X509Certificate::from_der(c.as_bytes()).unwrap().1)
        .collect();
    let leaf = &chain[0];
    let key = rcgen::KeyPair::try_from(svid.private_key().as_bytes()).expect("PKCS#8 key");
    assert_eq!(
        key.subject_public_key_info(),
        leaf.public_key().raw,
        "the key is the leaf's"
    );
    for pair in chain.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .expect("each certificate is signed by the next");
    }
    let td = TrustDomain::new("cluster.local").unwrap();
    let bundle = bundles
        .get(&td)
        .expect("a bundle for the SVID's trust domain");
    let last = chain.last().unwrap();
    let root = bundle
        .authorities()
        .iter()
        .map(|a| X509Certificate::from_der(a.as_bytes()).unwrap().1)
        .find(|root| last.verify_signature(Some(root.public_key())).is_ok())
        .expect("the chain verifies against an authority of the bundle");
    root.verify_signature(None).expect("a self-signed root");
    assert!(leaf.validity().is_valid());
    leaf.raw_serial_as_string()
}

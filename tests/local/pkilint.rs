//! What the agent serves with its local CA passes DigiCert's RFC 5280
//! linter, pkilint (see `support::pkilint`): the root, and the leaf of an
//! EC P-256 and of an RSA-2048 workload key, one agent each. An EC leaf
//! with keyEncipherment, for one, is an ERROR (RFC 8813).

use crate::support;

use std::fs;

use support::agent::Agent;
use support::pkilint::{assert_accepts, served_files};
use support::sds_client::fake_jwt;

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

#[test]
fn local_ca_leaves_and_root_pass_pkilint() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    fs::write(&token, fake_jwt("default", "httpbin")).unwrap();
    // Both agents start before either is waited for: their starts overlap.
    let agents: Vec<(&str, Agent, std::path::PathBuf)> = ["ec-p256", "rsa-2048"]
        .into_iter()
        .map(|key_type| {
            let home = dir.path().join(key_type);
            let out = home.join("certs");
            let agent = Agent::spawn(
                &home.join("sds.sock"),
                dir.path(),
                &[
                    ("CA_PROVIDER", "LocalCA".into()),
                    ("KEY_TYPE", key_type.into()),
                    ("WORKLOAD_TOKEN_PATH", token.display().to_string()),
                    ("OUTPUT_CERTS", out.display().to_string()),
                ],
            );
            (key_type, agent, home)
        })
        .collect();
    for (key_type, agent, home) in &agents {
        let (chain, root) = served_files(agent, &home.join("certs"));
        assert_accepts(
            &format!("LocalCA {key_type}"),
            home,
            &root,
            &chain,
            SPIFFE_ID,
        );
        assert!(
            !agent.log().contains("breaks X.509-SVID rules"),
            "the local CA makes valid X509-SVIDs:\n{}",
            agent.log()
        );
    }
}

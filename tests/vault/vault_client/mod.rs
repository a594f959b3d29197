//! The Vault client (`VaultCa`) used directly against a real OpenBao: token
//! lifetimes, invalidation and revocation, sign hold-downs ([`tokens`]), the
//! roots of the PKI mount and chains without their root ([`roots`]),
//! redirects through real fronts ([`redirects`]), and the CAs trusted for
//! Vault's TLS ([`tls_roots`]). This file builds the client
//! and the CSRs they share.

use std::collections::HashMap;
use std::time::Duration;

use node_agent::ca::vault::VaultCa;
use node_agent::config::{CaProvider, Config};
use node_agent::crypto::{KeyType, PrivateKey};
use node_agent::identity::SpiffeId;

mod redirects;
mod roots;
mod tls_roots;
mod tokens;

/// A Vault client configured from `vars` as the agent would be.
fn vault_ca(vars: &[(&'static str, String)]) -> VaultCa {
    let map: HashMap<&str, String> = vars.iter().cloned().collect();
    let config = Config::from_lookup(|k| map.get(k).cloned(), Some("/unused".into()))
        .expect("valid settings");
    let CaProvider::Vault(v) = config.ca else {
        panic!("not a Vault configuration")
    };
    VaultCa::new(v).expect("Vault client")
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId(format!("spiffe://cluster.local/ns/default/sa/{sa}"))
}

/// A CSR for `sa` and the key to check the answer with.
fn csr(sa: &str) -> (String, PrivateKey) {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    (key.csr_pem(&id(sa)).unwrap(), key)
}

const SIGN: &str = "istio_ca/sign/istio-pki-role";
const LOGIN: &str = "auth/kubernetes/login";
const REVOKE_SELF: &str = "auth/token/revoke-self";
const HOUR: Duration = Duration::from_secs(3600);

//! A real OpenBao dev server for integration tests, configured like the Istio
//! "Vault CA" tutorial (PKI at `istio_ca`, Kubernetes and JWT auth), plus a
//! pausable TCP proxy to simulate Vault outages.
//!
//! Dev mode keeps everything in memory, so a restarted server would lose its
//! PKI root, roles and tokens (and with `-dev-tls` even its TLS CA). Outages
//! are therefore simulated with [`ToggleProxy`] in front of one long-lived
//! server instead of stopping the process.
//!
//! [`server`] runs the process and speaks its HTTP API, [`tutorial`] configures
//! it as the tutorial does, [`pki`] rotates roots and makes intermediates,
//! [`proxy`] is the outage switch. Users name everything as `bao::Item`.

mod pki;
mod proxy;
mod server;
mod tutorial;

// Every test binary includes this module; not each uses every item.
#[allow(unused_imports)]
pub use pki::{rotate_root, rotate_root_issuer, setup_intermediate};
#[allow(unused_imports)]
pub use proxy::{ProxyMode, ToggleProxy};
#[allow(unused_imports)]
pub use server::Bao;
#[allow(unused_imports)]
pub use tutorial::{
    set_jwt_role_accounts, set_k8s_role_accounts, set_pki_role_uri_sans, setup_tutorial,
    setup_tutorial_with, TutorialOptions, TutorialSetup,
};

/// Root token of every dev server started here.
pub const ROOT_TOKEN: &str = "root";
/// Names used by the Istio Vault tutorial.
pub const PKI_MOUNT: &str = "istio_ca";
pub const PKI_ROLE: &str = "istio-pki-role";
pub const POLICY: &str = "istio-cert-policy";
pub const AUTH_ROLE: &str = "istio-cert";

//! Integration tests with real Envoys: mTLS between two Envoys fed by the
//! agent, rotation of leaves and roots, delta SDS, Istio's bootstrap.

#[path = "../support/mod.rs"]
mod support;

mod all_resource;
mod delta_sds;
mod envoy_mtls;
mod federation;
mod istio;
mod root_rotation;
mod rotation;

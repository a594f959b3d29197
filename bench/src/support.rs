//! The integration tests' real-peer helpers, shared verbatim: the TokenReview
//! stand-in that really verifies service-account JWTs, OpenBao set up like the
//! Istio tutorial, real Envoy processes, and the loopback port allocator.
#![allow(dead_code)]

#[path = "../../tests/support/bao/mod.rs"]
pub mod bao;
#[path = "../../tests/support/envoy/mod.rs"]
pub mod envoy;
#[path = "../../tests/support/k8s/mod.rs"]
pub mod k8s;
#[path = "../../tests/support/ports.rs"]
pub mod ports;

//! Shared test support: the agent process, an SDS client, real Envoy and OpenBao.
#![allow(dead_code)]

pub mod agent;
pub mod attack;
pub mod bao;
pub mod bundle_server;
pub mod cli;
pub mod envoy;
pub mod istio;
pub mod istio_inject;
pub mod k8s;
pub mod manifests;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod pkilint;
pub mod ports;
pub mod raft;
pub mod sds_client;
pub mod vault_env;
pub mod vault_front;

//! Shared test support: the agent process, an SDS client, real Envoy and OpenBao.
#![allow(dead_code)]

pub mod agent;
pub mod envoy;
pub mod sds_client;

//! Integration tests against a real three-node OpenBao Raft cluster, alone in
//! their binary: the cluster is the heaviest peer the tests start.

#[path = "../support/mod.rs"]
mod support;

mod vault_ha;

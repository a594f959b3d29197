//! Integration tests of the agent with its local CA (LocalCA): the SDS and
//! Workload API endpoints, their limits under attack, the certificate files,
//! and pkilint's verdict on the certificates served.
//! Few of them need a real OpenBao.

#[path = "../support/mod.rs"]
mod support;

mod attacks;
mod cert_files;
mod federation;
mod issuer_race;
mod pkilint;
mod sds_grpc;
mod vault_answer_props;
mod workload_api;

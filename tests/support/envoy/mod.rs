//! Test support: start real Envoy processes that take their TLS material
//! from an SDS server (the agent under test) over a Unix socket.
//!
//! Every Envoy gets its own temp dir holding its JSON config, log file,
//! stdout/stderr capture and admin-address file.  The admin API listens on an
//! OS-chosen port (`port_value: 0`) that Envoy writes to the file named by
//! `--admin-address-path`, so admin ports never race with other tests.
//!
//! Readiness: the SDS secrets (`default` certificate, `ROOTCA` trust bundle)
//! are part of listener warming (server side) and cluster warming (client
//! side). Both configs set `initial_fetch_timeout: 0s` on the SDS config
//! source, so Envoy waits for the secrets forever instead of giving up after
//! the 15 s default and serving with a listener/cluster that has no
//! certificate. Consequently `/ready` answers `200 LIVE` if and only if the
//! agent has delivered both secrets; while SDS is unreachable the admin API
//! is up but `/ready` answers `503`: `INITIALIZING` for the server Envoy
//! (listener warming) and `PRE_INITIALIZING` for the client Envoy (cluster
//! warming); see [`EnvoyProc::server_state`].
//!
//! [`config`] writes the bootstraps, [`process`] runs and watches Envoy,
//! [`backend`] is the HTTP server behind it, [`certs`] reads the certificates
//! Envoy's admin API shows. Users name everything as `envoy::Item`.

// Each integration-test binary uses only part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

mod backend;
mod certs;
mod config;
mod process;

// Every test binary includes this module; not each uses every item.
#[allow(unused_imports)]
pub use backend::start_backend;
#[allow(unused_imports)]
pub use certs::{ca_serials, cert_serials, cert_uris, leaf_certs};
#[allow(unused_imports)]
pub use config::{client_config, server_config, validate_config, SdsSource};
#[allow(unused_imports)]
pub use process::{start_client_envoy, start_server_envoy, EnvoyProc};

/// SDS resource name of the workload certificate (Istio convention).
pub const SECRET_DEFAULT: &str = "default";
/// SDS resource name of the trust bundle (Istio convention).
pub const SECRET_ROOTCA: &str = "ROOTCA";
/// Name of the static cluster pointing at the agent in [`SdsSource::EnvoyGrpc`] mode.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// Metadata header carrying the token in [`SdsSource::GoogleGrpc`] mode (Istio's name).
pub const SDS_TOKEN_HEADER: &str = "istio_sds_credentials_header-bin";

/// Response header set by the server Envoy: URI SAN of the client certificate it verified.
pub const HDR_SERVER_SAW_CLIENT_URI: &str = "x-test-downstream-peer-uri-san";
/// Response header set by the server Envoy: serial of the client certificate it verified.
pub const HDR_SERVER_SAW_CLIENT_SERIAL: &str = "x-test-downstream-peer-serial";
/// Response header set by the server Envoy: URI SAN of its own (SDS-served) certificate.
pub const HDR_SERVER_LOCAL_URI: &str = "x-test-downstream-local-uri-san";
/// Response header set by the client Envoy: URI SAN of the server certificate it verified.
pub const HDR_CLIENT_SAW_SERVER_URI: &str = "x-test-upstream-peer-uri-san";

/// How long `start_*` waits for Envoy's admin API to come up (not for SDS).
const ADMIN_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGSEGV's number on Linux (no `libc` dependency for one constant).
const SIGSEGV: i32 = 11;
/// Envoy's log-file flush interval; [`EnvoyProc::log`] lags by at most this.
const LOG_FLUSH_MS: u64 = 100;
/// Bytes of log shown in error messages; enough context without flooding test output.
const LOG_TAIL_BYTES: usize = 6000;

/// Returns a currently free TCP port on 127.0.0.1.
///
/// The port is released before returning, so another process could grab it;
/// acceptable for tests, and admin ports avoid the race entirely (see module docs).
pub fn free_port() -> u16 {
    super::ports::free_port()
}

/// Envoy binary: `ENVOY_BIN` if set, else `envoy` from PATH.
pub fn envoy_bin() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("envoy"))
}

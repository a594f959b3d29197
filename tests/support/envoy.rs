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

// Each integration-test binary uses only part of this module.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// How Envoy reaches the agent's SDS Unix socket.
#[derive(Debug, Clone)]
pub enum SdsSource {
    /// Envoy's Google gRPC client (Istio-style); sends the contents of
    /// `token_file` in the `istio_sds_credentials_header-bin` metadata header.
    GoogleGrpc {
        uds_path: PathBuf,
        token_file: PathBuf,
    },
    /// Envoy's own gRPC client via a static HTTP/2 cluster; sends no token.
    EnvoyGrpc { uds_path: PathBuf },
    /// The inner source with `api_type: DELTA_GRPC` (Envoy calls `DeltaSecrets`).
    Delta(Box<SdsSource>),
}

impl SdsSource {
    /// The `ConfigSource` used for both secrets.
    ///
    /// `initial_fetch_timeout: 0s` makes Envoy wait for SDS indefinitely so that
    /// `/ready == LIVE` means "secrets delivered" (see module docs).
    fn config_source(&self) -> Value {
        let grpc_service = match self {
            SdsSource::Delta(inner) => {
                let mut cs = inner.config_source();
                cs["api_config_source"]["api_type"] = json!("DELTA_GRPC");
                return cs;
            }
            SdsSource::GoogleGrpc {
                uds_path,
                token_file,
            } => json!({
                "google_grpc": {
                    "target_uri": format!("unix:{}", uds_path.display()),
                    "stat_prefix": "sds",
                    "channel_credentials": { "local_credentials": {} },
                    // Without this the call credentials plugin is never invoked
                    // and no header is sent (verified on Envoy 1.40).
                    "credentials_factory_name": "envoy.grpc_credentials.file_based_metadata",
                    "call_credentials": [{
                        "from_plugin": {
                            "name": "envoy.grpc_credentials.file_based_metadata",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.config.grpc_credential.v3.FileBasedMetadataConfig",
                                "secret_data": { "filename": token_file.display().to_string() },
                                "header_key": SDS_TOKEN_HEADER
                            }
                        }
                    }]
                }
            }),
            SdsSource::EnvoyGrpc { .. } => json!({
                "envoy_grpc": { "cluster_name": SDS_CLUSTER }
            }),
        };
        json!({
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc_service]
            }
        })
    }

    /// Extra static clusters this source needs (the HTTP/2 UDS cluster for EnvoyGrpc).
    fn clusters(&self) -> Vec<Value> {
        match self {
            SdsSource::Delta(inner) => inner.clusters(),
            SdsSource::GoogleGrpc { .. } => Vec::new(),
            SdsSource::EnvoyGrpc { uds_path } => vec![json!({
                "name": SDS_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} }
                    }
                },
                "load_assignment": {
                    "cluster_name": SDS_CLUSTER,
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "pipe": { "path": uds_path.display().to_string() }
                    }}}]}]
                }
            })],
        }
    }

    /// `common_tls_context` shared by both sides: SDS `default` cert plus
    /// SDS `ROOTCA` combined with a static exact URI-SAN match on the peer.
    fn common_tls_context(&self, expected_peer_spiffe: &str) -> Value {
        let cs = self.config_source();
        json!({
            "tls_certificate_sds_secret_configs": [{ "name": SECRET_DEFAULT, "sds_config": cs }],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [{
                        "san_type": "URI",
                        "matcher": { "exact": expected_peer_spiffe }
                    }]
                },
                "validation_context_sds_secret_config": { "name": SECRET_ROOTCA, "sds_config": cs }
            }
        })
    }
}

/// Static STATIC cluster with a single 127.0.0.1 endpoint.
fn local_cluster(name: &str, port: u16, transport_socket: Option<Value>) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": "127.0.0.1", "port_value": port }
            }}}]}]
        }
    });
    if let Some(ts) = transport_socket {
        c["transport_socket"] = ts;
    }
    c
}

/// HTTP connection manager routing every request to `cluster`, adding
/// `response_headers` (Envoy substitution format strings) to every response.
fn http_connection_manager(
    stat_prefix: &str,
    cluster: &str,
    response_headers: &[(&str, &str)],
) -> Value {
    let headers: Vec<Value> = response_headers
        .iter()
        .map(|(k, v)| {
            json!({
                "header": { "key": k, "value": v },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
            })
        })
        .collect();
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "name": "all",
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
                }],
                "response_headers_to_add": headers
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
            }]
        }
    })
}

fn bootstrap(node_id: &str, node_cluster: &str, listener: Value, clusters: Vec<Value>) -> Value {
    json!({
        "node": { "id": node_id, "cluster": node_cluster },
        "admin": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } }
        },
        "static_resources": { "listeners": [listener], "clusters": clusters }
    })
}

/// Bootstrap for the mTLS-terminating "server" Envoy (see [`start_server_envoy`]).
pub fn server_config(
    sds: &SdsSource,
    listen_port: u16,
    backend_port: u16,
    expected_client_spiffe: &str,
) -> Value {
    let hcm = http_connection_manager(
        "server_in",
        "backend",
        &[
            (HDR_SERVER_SAW_CLIENT_URI, "%DOWNSTREAM_PEER_URI_SAN%"),
            (HDR_SERVER_SAW_CLIENT_SERIAL, "%DOWNSTREAM_PEER_SERIAL%"),
            (HDR_SERVER_LOCAL_URI, "%DOWNSTREAM_LOCAL_URI_SAN%"),
        ],
    );
    let listener = json!({
        "name": "server_mtls",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": listen_port } },
        "filter_chains": [{
            "filters": [hcm],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true,
                    "common_tls_context": sds.common_tls_context(expected_client_spiffe)
                }
            }
        }]
    });
    let mut clusters = vec![local_cluster("backend", backend_port, None)];
    clusters.extend(sds.clusters());
    bootstrap("envoy-server", "test-server", listener, clusters)
}

/// Bootstrap for the mTLS-originating "client" Envoy (see [`start_client_envoy`]).
pub fn client_config(
    sds: &SdsSource,
    listen_port: u16,
    server_port: u16,
    expected_server_spiffe: &str,
) -> Value {
    let hcm = http_connection_manager(
        "client_out",
        "server_mtls",
        &[(HDR_CLIENT_SAW_SERVER_URI, "%UPSTREAM_PEER_URI_SAN%")],
    );
    let listener = json!({
        "name": "client_plain",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": listen_port } },
        "filter_chains": [{ "filters": [hcm] }]
    });
    let tls = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": sds.common_tls_context(expected_server_spiffe)
        }
    });
    let mut clusters = vec![local_cluster("server_mtls", server_port, Some(tls))];
    clusters.extend(sds.clusters());
    bootstrap("envoy-client", "test-client", listener, clusters)
}

/// Runs `envoy --mode validate -c path`; the error includes Envoy's output.
pub async fn validate_config(path: &Path) -> Result<()> {
    let out = tokio::process::Command::new(envoy_bin())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(path)
        .arg("--disable-hot-restart")
        .arg("-l")
        .arg("warn")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} --mode validate", envoy_bin().display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Envoy 1.40 segfaults while shutting down `--mode validate` whenever a
    // cluster's transport socket uses Google gRPC SDS, *after* printing its
    // verdict. Trust the verdict in that case; real runs are unaffected.
    let ok_then_segv = out.status.signal() == Some(SIGSEGV)
        && stdout.contains(&format!("configuration '{}' OK", path.display()));
    if !out.status.success() && !ok_then_segv {
        bail!(
            "envoy --mode validate {} failed ({}):\n{}{}",
            path.display(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A running Envoy; SIGKILLed and reaped on drop, temp dir removed afterwards.
pub struct EnvoyProc {
    // `Drop::drop` kills the child before the fields (and so `dir`) are dropped.
    child: Mutex<Child>,
    admin_port: u16,
    config_path: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    http: reqwest::Client,
    dir: TempDir,
}

impl EnvoyProc {
    /// Writes `config` to a fresh temp dir and starts Envoy on it, returning
    /// once the admin API is listening (NOT once secrets arrived: use
    /// [`EnvoyProc::wait_ready`]).
    pub async fn start(config: &Value) -> Result<EnvoyProc> {
        Self::start_with(config, None).await
    }

    /// [`EnvoyProc::start`] in working directory `cwd`, as a pod's Envoy runs
    /// in `/`: relative paths in `config` (Istio's `./var/run/...` pipe) are
    /// resolved from there.
    pub async fn start_in(config: &Value, cwd: &Path) -> Result<EnvoyProc> {
        Self::start_with(config, Some(cwd)).await
    }

    async fn start_with(config: &Value, cwd: Option<&Path>) -> Result<EnvoyProc> {
        let dir = tempfile::Builder::new().prefix("envoy-test-").tempdir()?;
        let config_path = dir.path().join("envoy.json");
        let log_path = dir.path().join("envoy.log");
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        let admin_path = dir.path().join("admin-address");
        std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)?;

        let mut cmd = Command::new(envoy_bin());
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let child = cmd
            .arg("-c")
            .arg(&config_path)
            // Hot restart is useless here and would need shared memory keyed by
            // base id; the unique base id is belt and braces for parallel Envoys.
            .arg("--disable-hot-restart")
            .arg("--base-id")
            .arg(unique_base_id().to_string())
            .arg("--log-path")
            .arg(&log_path)
            // The log file is buffered and flushed every 10 s by default, far
            // too late for assertion messages.
            .arg("--file-flush-interval-msec")
            .arg(LOG_FLUSH_MS.to_string())
            .arg("-l")
            .arg("info")
            .arg("--concurrency")
            .arg("1")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path)?)
            // Errors before the log file is opened (bad flags, bad config) land here.
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()
            .with_context(|| format!("spawning {}", envoy_bin().display()))?;

        let mut proc = EnvoyProc {
            child: Mutex::new(child),
            admin_port: 0,
            config_path,
            log_path,
            stderr_path,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .no_proxy()
                .build()?,
            dir,
        };
        proc.admin_port = proc.wait_admin_port(&admin_path).await?;
        Ok(proc)
    }

    async fn wait_admin_port(&self, admin_path: &Path) -> Result<u16> {
        let deadline = Instant::now() + ADMIN_STARTUP_TIMEOUT;
        loop {
            self.check_alive()?;
            // Envoy writes "127.0.0.1:PORT" once the admin listener is bound.
            if let Ok(s) = std::fs::read_to_string(admin_path) {
                if let Some(port) = s.trim().rsplit(':').next().and_then(|p| p.parse().ok()) {
                    return Ok(port);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy admin API did not come up within {ADMIN_STARTUP_TIMEOUT:?}\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Errors (with the log tail) if the Envoy process has exited.
    pub fn check_alive(&self) -> Result<()> {
        let status = self.child.lock().unwrap().try_wait()?;
        match status {
            None => Ok(()),
            Some(st) => Err(anyhow!("Envoy exited early ({st})\n{}", self.log_tail())),
        }
    }

    /// OS process id of Envoy (the `envoy` wrapper execs the real binary).
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// Port of the admin API on 127.0.0.1.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Path of the generated bootstrap config (kept until drop).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Temp dir holding config and logs (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn admin_url(&self, path_and_query: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path_and_query)
    }

    /// GET an admin path; returns status and body.
    pub async fn admin_get(&self, path_and_query: &str) -> Result<(u16, String)> {
        let resp = self.http.get(self.admin_url(path_and_query)).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// Admin `/certs`: `{"certificates":[{"ca_cert":[..],"cert_chain":[..]}]}`,
    /// one entry per TLS context; see [`cert_uris`] / [`cert_serials`].
    pub async fn certs(&self) -> Value {
        let resp = self.http.get(self.admin_url("/certs")).send().await;
        match resp {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// Current value of counter/gauge `name` (exact match), `None` if absent.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        self.stat_value(name).await?.as_u64()
    }

    /// Raw JSON value of stat `name`: a number for counters and gauges, a
    /// string for text readouts.
    async fn stat_value(&self, name: &str) -> Option<Value> {
        let filter = format!("^{}$", regex_escape(name));
        let resp = self
            .http
            .get(self.admin_url("/stats"))
            .query(&[("filter", filter.as_str()), ("format", "json")])
            .send()
            .await
            .ok()?;
        let v: Value = resp.json().await.ok()?;
        v.get("stats")?
            .as_array()?
            .iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(name))?
            .get("value")
            .cloned()
    }

    /// Current value of text readout `name` (e.g. `sds.default.version_text`,
    /// the version the agent sent last), `None` if absent.
    pub async fn stat_text(&self, name: &str) -> Option<String> {
        self.stat_value(name).await?.as_str().map(str::to_string)
    }

    /// Server state from `/ready`: `LIVE`, `PRE_INITIALIZING`, `INITIALIZING`,
    /// `DRAINING` (HTTP 200 only for `LIVE`).
    pub async fn server_state(&self) -> Result<String> {
        let (_, body) = self.admin_get("/ready").await?;
        Ok(body.trim().to_string())
    }

    /// Polls `/ready` until `200 LIVE`, i.e. until SDS delivered both secrets
    /// and every listener and cluster is warm.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = match self.admin_get("/ready").await {
                Ok((200, body)) if body.trim() == "LIVE" => return Ok(()),
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => format!("error: {e}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "Envoy not LIVE after {timeout:?} (last /ready: {last})\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Envoy's log (plus stderr if non-empty), for assertion messages.
    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        if !err.trim().is_empty() {
            let _ = write!(s, "\n--- stderr ---\n{err}");
        }
        s
    }

    /// Last few KiB of [`EnvoyProc::log`], labelled.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let mut start = log.len().saturating_sub(LOG_TAIL_BYTES);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        format!("--- envoy log tail ---\n{}", &log[start..])
    }
}

impl Drop for EnvoyProc {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Distinct per process and per call, so parallel tests and test binaries
/// never share a base id.
fn unique_base_id() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Keep it well below u32::MAX: Envoy multiplies the base id internally.
    (std::process::id().wrapping_mul(1000) ^ nanos.wrapping_mul(7) ^ n.wrapping_mul(1_000_003))
        % 1_000_000
        + 1
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Starts an Envoy terminating mTLS on `127.0.0.1:listen_port` with SDS
/// secrets, requiring a client cert whose URI SAN is `expected_client_spiffe`,
/// proxying plain HTTP/1.1 to `127.0.0.1:backend_port`.
///
/// Responses carry [`HDR_SERVER_SAW_CLIENT_URI`], [`HDR_SERVER_SAW_CLIENT_SERIAL`]
/// and [`HDR_SERVER_LOCAL_URI`] so tests can see which identities were used.
/// Returns once the admin API is up; call [`EnvoyProc::wait_ready`] before
/// sending traffic.
pub async fn start_server_envoy(
    sds: SdsSource,
    listen_port: u16,
    backend_port: u16,
    expected_client_spiffe: &str,
) -> Result<EnvoyProc> {
    EnvoyProc::start(&server_config(
        &sds,
        listen_port,
        backend_port,
        expected_client_spiffe,
    ))
    .await
}

/// Starts an Envoy accepting plain HTTP on `127.0.0.1:listen_port` and
/// originating mTLS (SDS secrets, server URI SAN must be
/// `expected_server_spiffe`) to `127.0.0.1:server_port`.
///
/// Responses carry [`HDR_CLIENT_SAW_SERVER_URI`]. Returns once the admin API is
/// up; call [`EnvoyProc::wait_ready`] before sending traffic.
pub async fn start_client_envoy(
    sds: SdsSource,
    listen_port: u16,
    server_port: u16,
    expected_server_spiffe: &str,
) -> Result<EnvoyProc> {
    EnvoyProc::start(&client_config(
        &sds,
        listen_port,
        server_port,
        expected_server_spiffe,
    ))
    .await
}

/// Tiny HTTP/1.1 server on `127.0.0.1:port` answering every request with
/// `200` and `body`. Supports keep-alive (Envoy pools upstream connections).
/// Abort the returned handle to stop accepting.
pub async fn start_backend(port: u16, body: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("backend bind 127.0.0.1:{port}: {e}"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_backend_conn(stream, body));
        }
    })
}

async fn serve_backend_conn(mut stream: TcpStream, body: &'static str) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read until the end of the request head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
        };
        let content_length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Chunked request bodies are not parsed; answer and close instead.
        let close = header("connection").as_deref() == Some("close")
            || header("transfer-encoding").is_some()
            || head.starts_with("get / http/1.0") && header("connection").is_none();

        // Discard the request body.
        while buf.len() < head_end + content_length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + content_length);

        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{}",
            body.len(),
            if close { "close" } else { "keep-alive" },
            body
        );
        if stream.write_all(resp.as_bytes()).await.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Every certificate object (`ca_cert[]` and `cert_chain[]` entries) in `/certs` output.
fn cert_details(certs_json: &Value) -> impl Iterator<Item = &Value> {
    certs_json
        .get("certificates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|c| {
            ["ca_cert", "cert_chain"]
                .into_iter()
                .filter_map(move |k| c.get(k).and_then(Value::as_array))
                .flatten()
        })
}

/// All `subject_alt_names[].uri` values in admin `/certs` output
/// (trust bundle and leaf certificates alike, in document order, with duplicates).
pub fn cert_uris(certs_json: &Value) -> Vec<String> {
    cert_details(certs_json)
        .filter_map(|d| d.get("subject_alt_names").and_then(Value::as_array))
        .flatten()
        .filter_map(|san| san.get("uri").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// All `serial_number` values (lowercase hex, as Envoy prints them) in admin
/// `/certs` output, in document order, with duplicates.
pub fn cert_serials(certs_json: &Value) -> Vec<String> {
    cert_details(certs_json)
        .filter_map(|d| d.get("serial_number").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// The leaf certificates (`cert_chain[0]` of each TLS context) in `/certs`
/// output: (SPIFFE URI, serial, expiration_time as Envoy prints it).
pub fn leaf_certs(certs_json: &Value) -> Vec<(String, String, String)> {
    certs_json
        .get("certificates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("cert_chain").and_then(Value::as_array)?.first())
        .map(|leaf| {
            let s = |k: &str| {
                leaf.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let uri = leaf
                .get("subject_alt_names")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find_map(|san| san.get("uri").and_then(Value::as_str))
                })
                .unwrap_or_default()
                .to_string();
            (uri, s("serial_number"), s("expiration_time"))
        })
        .collect()
}

/// Serials of the trusted CA certificates (`ca_cert[]`) in `/certs` output.
pub fn ca_serials(certs_json: &Value) -> Vec<String> {
    certs_json
        .get("certificates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("ca_cert").and_then(Value::as_array))
        .flatten()
        .filter_map(|d| d.get("serial_number").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

//! A running Envoy ([`EnvoyProc`]): started with its own base id and temp
//! dir, its admin API found and asked (readiness, server state, stats,
//! certificates), its log read and shown when a test fails, killed
//! on drop; and the two Envoys of a mesh test, server and client.

use super::{client_config, server_config, SdsSource};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use super::{envoy_bin, ADMIN_STARTUP_TIMEOUT, LOG_FLUSH_MS, LOG_TAIL_BYTES};

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

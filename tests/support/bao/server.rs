//! A `bao server` process (a dev server, or a node of a Raft cluster) and its
//! HTTP API as the tests use it: started, waited for, asked with the root
//! token (optionally in a namespace), its audit log read, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::ROOT_TOKEN;

/// A `bao server` child process (a dev server, or a node of a Raft cluster,
/// see `super::raft`); killed on drop.
pub struct Bao {
    child: Option<Child>,
    /// Owned scratch directory (dev servers); Raft nodes share the cluster's.
    _tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    addr: SocketAddr,
    tls: bool,
    client: reqwest::Client,
    /// Root token of this server (`root` for dev servers).
    token: String,
    /// The audit log file (the same file on every node of a cluster).
    audit_path: PathBuf,
    /// Time from spawn until `/v1/sys/health` answered 200.
    pub startup: Duration,
    /// Namespace every later call is made in (`X-Vault-Namespace`).
    pub(super) namespace: std::sync::Mutex<Option<String>>,
}

impl Bao {
    /// Starts `bao server -dev -dev-tls` (HTTPS with a generated CA).
    pub async fn start_tls() -> anyhow::Result<Self> {
        Self::start(true).await
    }

    /// Starts `bao server -dev` (plain HTTP).
    pub async fn start_plain() -> anyhow::Result<Self> {
        Self::start(false).await
    }

    /// Starts a dev server on a free port. Retries with another port because
    /// the port (and its cluster port, PORT+1) is only probed, not held.
    pub async fn start(tls: bool) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(tls).await {
                Ok(b) => return Ok(b),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    async fn try_start(tls: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("bao-test").tempdir()?;
        let port = super::super::ports::free_port_pair();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let audit = dir.path().join("audit.log");
        // Audit devices cannot be enabled over the API in OpenBao; declare it.
        let config = dir.path().join("bao.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"log\" {{\n  options {{\n    file_path = {:?}\n  }}\n}}\n",
                audit.display().to_string()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("bao.log"))?;
        // `BAO_BIN` lets CI point at the real binary and skip the pyenv shim.
        let bin = std::env::var("BAO_BIN").unwrap_or_else(|_| "bao".into());
        let mut cmd = Command::new(bin);
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address={addr}"))
            .arg(format!("-config={}", config.display()))
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if tls {
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", dir.path().display()));
        }
        let started = Instant::now();
        let child = cmd.spawn().context("spawn `bao server -dev`")?;
        let mut bao = Self {
            child: Some(child),
            dir: dir.path().to_path_buf(),
            _tmp: Some(dir),
            addr,
            tls,
            client: reqwest::Client::new(),
            token: ROOT_TOKEN.to_string(),
            audit_path: audit,
            startup: Duration::ZERO,
            namespace: std::sync::Mutex::new(None),
        };
        bao.wait_healthy(started).await?;
        bao.startup = started.elapsed();
        Ok(bao)
    }

    /// A running `bao server` (a Raft node) that logs to `dir/bao.log`.
    pub(crate) fn node(child: Child, dir: PathBuf, addr: SocketAddr, audit_path: PathBuf) -> Self {
        Self {
            child: Some(child),
            _tmp: None,
            dir,
            addr,
            tls: false,
            client: reqwest::Client::new(),
            token: String::new(),
            audit_path,
            startup: Duration::ZERO,
            namespace: std::sync::Mutex::new(None),
        }
    }

    /// Sets the root token (a Raft cluster's, from `operator init`).
    pub(crate) fn set_root_token(&mut self, token: &str) {
        self.token = token.to_string();
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn wait_healthy(&mut self, started: Instant) -> anyhow::Result<()> {
        while started.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                bail!("bao exited early ({}): {}", status?, self.log_tail());
            }
            // The CA file appears shortly before the listener accepts.
            if self.tls && self.client_ready().is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let url = format!("{}/v1/sys/health", self.addr());
            if let Ok(r) = self.client.get(&url).send().await {
                if r.status() == StatusCode::OK {
                    // The port was only probed: another server may have
                    // taken it first, and answered for the child that could
                    // not bind. Only the child's own listener will do.
                    let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
                    if !listens_on(pid, self.addr.port()) {
                        bail!(
                            "another server answers on {}; bao could not bind it: {}",
                            self.addr,
                            self.log_tail()
                        );
                    }
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("bao did not become healthy: {}", self.log_tail())
    }

    fn client_ready(&mut self) -> anyhow::Result<()> {
        let pem = std::fs::read(self.ca_pem_path())?;
        let ca = reqwest::Certificate::from_pem(&pem)?;
        self.client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()?;
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("bao.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("Token")).collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// `https://127.0.0.1:PORT` (or `http://` for [`Bao::start_plain`]).
    pub fn addr(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dev-tls CA (`vault-ca.pem`); for a plain server the file is absent.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.join("vault-ca.pem")
    }

    pub fn root_token(&self) -> &str {
        &self.token
    }

    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_path.clone()
    }

    /// Scratch directory of this server (removed on drop for dev servers).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client that trusts the dev CA.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Counts audited requests (not responses) whose `request.path` equals
    /// `path` (e.g. `auth/kubernetes/login`; a leading `/v1/` is ignored).
    /// Audit entries are written before the response is sent, so a count
    /// taken after a call returned includes that call.
    pub fn audit_requests(&self, path: &str) -> usize {
        let want = path.trim_start_matches('/').trim_start_matches("v1/");
        self.audited_requests()
            .iter()
            .filter(|e| e["request"]["path"] == want)
            .count()
    }

    /// Every audited request (`type: request` entries), in order.
    pub fn audited_requests(&self) -> Vec<Value> {
        let log = std::fs::read_to_string(self.audit_log_path()).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["type"] == "request")
            .collect()
    }

    /// Sends a request as `token` and returns status and JSON body (`null`
    /// when empty). Errors only on transport failure.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let url = format!("{}/v1/{}", self.addr(), path.trim_start_matches('/'));
        let mut req = self.client.request(method, url);
        if let Some(ns) = self.namespace.lock().unwrap().as_deref() {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok((status, json))
    }

    /// Root-token call that fails on a non-2xx status with Vault's `errors`.
    pub async fn root(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, json) = self
            .call(method.clone(), path, Some(&self.token), body.as_ref())
            .await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {}", json["errors"]);
        }
        Ok(json)
    }

    /// Kills the server with SIGKILL (also done on drop). A dev server's
    /// state is lost.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True when process `pid` holds the loopback TCP listener on `port` (read
/// from /proc: the listener's socket inode among the process's descriptors).
fn listens_on(pid: u32, port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!(":{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode
            (f.len() > 9 && f[1].ends_with(&want) && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|l| {
                let l = l.to_string_lossy();
                inodes.iter().any(|i| l == format!("socket:[{i}]"))
            })
            .unwrap_or(false)
    })
}

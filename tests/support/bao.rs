//! A real OpenBao dev server for integration tests, configured like the Istio
//! "Vault CA" tutorial (PKI at `istio_ca`, Kubernetes and JWT auth), plus a
//! pausable TCP proxy to simulate Vault outages.
//!
//! Dev mode keeps everything in memory, so a restarted server would lose its
//! PKI root, roles and tokens (and with `-dev-tls` even its TLS CA). Outages
//! are therefore simulated with [`ToggleProxy`] in front of one long-lived
//! server instead of stopping the process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::k8s::{TestIssuer, DEFAULT_AUDIENCE};

/// Root token of every dev server started here.
pub const ROOT_TOKEN: &str = "root";
/// Names used by the Istio Vault tutorial.
pub const PKI_MOUNT: &str = "istio_ca";
pub const PKI_ROLE: &str = "istio-pki-role";
pub const POLICY: &str = "istio-cert-policy";
pub const AUTH_ROLE: &str = "istio-cert";

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
    namespace: std::sync::Mutex<Option<String>>,
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
        let port = super::ports::free_port_pair();
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

/// Options for [`setup_tutorial_with`].
#[derive(Clone, Debug)]
pub struct TutorialOptions {
    /// `kubernetes_host`: the TokenReview server URL.
    pub token_review_url: String,
    pub trust_domain: String,
    /// Service accounts the `istio-cert` auth roles accept.
    pub sa_names: Vec<String>,
    pub sa_namespaces: Vec<String>,
    /// Bind the URI SAN to the login's SA (templated `allowed_uri_sans`)
    /// instead of accepting any `spiffe://*`.
    pub bind_uri_to_sa: bool,
    /// PKI role `ttl` / `max_ttl`, e.g. "1h" / "24h".
    pub cert_ttl: String,
    pub cert_max_ttl: String,
    /// Vault token TTL of logins, e.g. "1h".
    pub token_ttl: String,
    /// Kubernetes role `audience` (sent in the TokenReview when set).
    pub k8s_audience: Option<String>,
    /// JWT role `bound_audiences`.
    pub jwt_audiences: Vec<String>,
    /// Set everything up inside this (new) namespace instead of the root.
    pub namespace: Option<String>,
    /// PKI role `no_store` (certificates not stored: a standby signs itself).
    pub no_store: bool,
    /// Auth roles' `token_type` (`service`, `batch`), when set.
    pub token_type: Option<String>,
}

impl TutorialOptions {
    pub fn new(token_review_url: &str, trust_domain: &str) -> Self {
        Self {
            token_review_url: token_review_url.to_string(),
            trust_domain: trust_domain.to_string(),
            sa_names: vec!["httpbin".into(), "sleep".into()],
            sa_namespaces: vec!["default".into()],
            bind_uri_to_sa: false,
            cert_ttl: "1h".into(),
            cert_max_ttl: "24h".into(),
            token_ttl: "1h".into(),
            k8s_audience: None,
            jwt_audiences: vec![DEFAULT_AUDIENCE.into()],
            namespace: None,
            no_store: false,
            token_type: None,
        }
    }
}

/// What [`setup_tutorial`] created.
#[derive(Clone, Debug)]
pub struct TutorialSetup {
    /// Root CA PEM of the PKI mount's default issuer.
    pub root_pem: String,
    /// Mount accessors (`auth_kubernetes_…`, `auth_jwt_…`), used by identity
    /// templates.
    pub k8s_accessor: String,
    pub jwt_accessor: String,
}

/// [`setup_tutorial_with`] with defaults: SAs `httpbin` and `sleep` in
/// `default`, any `spiffe://*` URI SAN, 1h certs and tokens.
pub async fn setup_tutorial(
    bao: &Bao,
    issuer: &TestIssuer,
    token_review_url: &str,
    trust_domain: &str,
) -> anyhow::Result<TutorialSetup> {
    setup_tutorial_with(
        bao,
        issuer,
        &TutorialOptions::new(token_review_url, trust_domain),
    )
    .await
}

/// Configures `bao` as the Istio Vault tutorial does, through the HTTP API.
pub async fn setup_tutorial_with(
    bao: &Bao,
    issuer: &TestIssuer,
    o: &TutorialOptions,
) -> anyhow::Result<TutorialSetup> {
    use Method as M;
    if let Some(ns) = &o.namespace {
        bao.root(M::POST, &format!("sys/namespaces/{ns}"), None)
            .await?;
        *bao.namespace.lock().unwrap() = Some(ns.clone());
    }
    bao.root(
        M::POST,
        &format!("sys/mounts/{PKI_MOUNT}"),
        Some(json!({ "type": "pki", "config": { "max_lease_ttl": "87600h" } })),
    )
    .await?;
    let root = bao
        .root(
            M::POST,
            &format!("{PKI_MOUNT}/root/generate/internal"),
            Some(
                json!({ "common_name": "istio-ca.test", "issuer_name": "root-0", "ttl": "87600h" }),
            ),
        )
        .await?;
    let root_pem = root["data"]["certificate"]
        .as_str()
        .ok_or_else(|| anyhow!("no root certificate"))?
        .to_string();

    bao.root(
        M::POST,
        "sys/auth/kubernetes",
        Some(json!({ "type": "kubernetes" })),
    )
    .await?;
    bao.root(M::POST, "sys/auth/jwt", Some(json!({ "type": "jwt" })))
        .await?;
    let auths = bao.root(M::GET, "sys/auth", None).await?;
    let accessor = |m: &str| -> anyhow::Result<String> {
        auths["data"][m]["accessor"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("no accessor for {m}"))
    };
    let (k8s_accessor, jwt_accessor) = (accessor("kubernetes/")?, accessor("jwt/")?);

    let td = &o.trust_domain;
    let allowed_uri_sans = if o.bind_uri_to_sa {
        // One template per auth method: a template whose accessor is not the
        // login's cannot render and so allows nothing.
        [&k8s_accessor, &jwt_accessor]
            .iter()
            .map(|a| {
                format!(
                    "spiffe://{td}/ns/{{{{identity.entity.aliases.{a}.metadata.service_account_namespace}}}}\
                     /sa/{{{{identity.entity.aliases.{a}.metadata.service_account_name}}}}"
                )
            })
            .collect::<Vec<_>>()
    } else {
        vec!["spiffe://*".to_string()]
    };
    bao.root(
        M::POST,
        &format!("{PKI_MOUNT}/roles/{PKI_ROLE}"),
        Some(json!({
            "allow_any_name": true,
            "require_cn": false,
            "allowed_uri_sans": allowed_uri_sans,
            "allowed_uri_sans_template": o.bind_uri_to_sa,
            "use_csr_sans": true,
            "use_csr_common_name": false,
            "enforce_hostnames": false,
            "key_type": "any",
            // Leaves with basicConstraints (cA=false): X509-SVIDs, which
            // SPIFFE clients of the Workload API require.
            "basic_constraints_valid_for_non_ca": true,
            "ttl": o.cert_ttl,
            "max_ttl": o.cert_max_ttl,
            "no_store": o.no_store,
        })),
    )
    .await?;
    bao.root(
        M::POST,
        &format!("sys/policies/acl/{POLICY}"),
        Some(json!({
            "policy": format!(
                "path \"{PKI_MOUNT}/sign/{PKI_ROLE}\" {{\n  capabilities = [\"create\", \"update\"]\n}}\n"
            )
        })),
    )
    .await?;

    bao.root(
        M::POST,
        "auth/kubernetes/config",
        Some(json!({
            "kubernetes_host": o.token_review_url,
            // Required with disable_local_ca_jwt even for http://; unused then.
            "kubernetes_ca_cert": root_pem,
            "disable_local_ca_jwt": true,
            "token_reviewer_jwt": issuer.mint("kube-system", "vault-auth", Duration::from_secs(86400 * 365)),
        })),
    )
    .await?;
    let mut k8s_role = json!({
        "bound_service_account_names": o.sa_names,
        "bound_service_account_namespaces": o.sa_namespaces,
        "token_policies": [POLICY],
        "token_ttl": o.token_ttl,
    });
    if let Some(aud) = &o.k8s_audience {
        k8s_role["audience"] = json!(aud);
    }
    if let Some(t) = &o.token_type {
        k8s_role["token_type"] = json!(t);
    }
    bao.root(
        M::POST,
        &format!("auth/kubernetes/role/{AUTH_ROLE}"),
        Some(k8s_role),
    )
    .await?;

    bao.root(
        M::POST,
        "auth/jwt/config",
        Some(json!({ "jwt_validation_pubkeys": [issuer.public_key_pem()] })),
    )
    .await?;
    bao.root(
        M::POST,
        &format!("auth/jwt/role/{AUTH_ROLE}"),
        Some(json!({
            "role_type": "jwt",
            "user_claim": "sub",
            "bound_audiences": o.jwt_audiences,
            "bound_claims": { "sub": subjects(&o.sa_names, &o.sa_namespaces) },
            // Same alias metadata keys as the kubernetes method, so the same
            // URI template shape works for both.
            "claim_mappings": {
                "/kubernetes.io/namespace": "service_account_namespace",
                "/kubernetes.io/serviceaccount/name": "service_account_name",
            },
            "token_policies": [POLICY],
            "token_ttl": o.token_ttl,
            "token_type": o.token_type.as_deref().unwrap_or("default"),
        })),
    )
    .await?;
    Ok(TutorialSetup {
        root_pem,
        k8s_accessor,
        jwt_accessor,
    })
}

fn subjects<S: AsRef<str>>(names: &[S], namespaces: &[S]) -> Vec<String> {
    namespaces
        .iter()
        .flat_map(|ns| {
            names
                .iter()
                .map(move |sa| format!("system:serviceaccount:{}:{}", ns.as_ref(), sa.as_ref()))
        })
        .collect()
}

/// Rebinds the kubernetes `istio-cert` role to other service accounts.
pub async fn set_k8s_role_accounts(
    bao: &Bao,
    names: &[&str],
    namespaces: &[&str],
) -> anyhow::Result<()> {
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{AUTH_ROLE}"),
        Some(json!({
            "bound_service_account_names": names,
            "bound_service_account_namespaces": namespaces,
        })),
    )
    .await
    .map(drop)
}

/// Rebinds the jwt `istio-cert` role (its `sub` claim) to other accounts.
/// A jwt role update is a full replace (omitted fields reset, `role_type`
/// falls back to `oidc`), hence read-modify-write.
pub async fn set_jwt_role_accounts(
    bao: &Bao,
    names: &[&str],
    namespaces: &[&str],
) -> anyhow::Result<()> {
    let path = format!("auth/jwt/role/{AUTH_ROLE}");
    let mut role = bao.root(Method::GET, &path, None).await?["data"].take();
    role["bound_claims"] = json!({ "sub": subjects(names, namespaces) });
    bao.root(Method::POST, &path, Some(role)).await.map(drop)
}

/// Limits the tutorial's PKI role to other URI SANs (`allowed_uri_sans`),
/// keeping the rest: a PKI role update replaces every field, hence
/// read-modify-write.
pub async fn set_pki_role_uri_sans(bao: &Bao, allowed: &[&str]) -> anyhow::Result<()> {
    let path = format!("{PKI_MOUNT}/roles/{PKI_ROLE}");
    let mut role = bao.root(Method::GET, &path, None).await?["data"].take();
    role["allowed_uri_sans"] = json!(allowed);
    bao.root(Method::POST, &path, Some(role)).await.map(drop)
}

/// Rotates the PKI mount's root as Vault's documentation describes it:
/// `root/rotate/internal` makes a new root issuer, and `config/issuers`
/// makes it the default, so later signs chain to it. The old issuer stays
/// (certificates it issued remain verifiable, and the mount still lists it).
/// Returns the new root PEM.
pub async fn rotate_root(bao: &Bao) -> anyhow::Result<String> {
    Ok(rotate_root_issuer(bao).await?.1)
}

/// [`rotate_root`], also returning the new issuer's ID.
pub async fn rotate_root_issuer(bao: &Bao) -> anyhow::Result<(String, String)> {
    let name = format!("root-{}", rand::random::<u32>());
    let new = bao
        .root(
            Method::POST,
            &format!("{PKI_MOUNT}/root/rotate/internal"),
            Some(json!({ "common_name": "istio-ca.test", "issuer_name": name, "ttl": "87600h" })),
        )
        .await?;
    let id = new["data"]["issuer_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no issuer_id"))?
        .to_string();
    bao.root(
        Method::POST,
        &format!("{PKI_MOUNT}/config/issuers"),
        Some(json!({ "default": id })),
    )
    .await?;
    let pem = new["data"]["certificate"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow!("no certificate"))?;
    Ok((id, pem))
}

/// Makes `mount` a PKI mount holding only an intermediate CA signed by the
/// root of [`PKI_MOUNT`], with a role like the tutorial's. With
/// `with_root`, the root is imported into the mount too (as an issuer
/// without key); otherwise the mount does not know its root. With
/// `chain_self`, the intermediate's `manual_chain` is itself only, so sign
/// answers carry no root even when the mount lists one. Returns the
/// intermediate's PEM.
pub async fn setup_intermediate(
    bao: &Bao,
    mount: &str,
    with_root: bool,
    chain_self: bool,
) -> anyhow::Result<String> {
    use Method as M;
    bao.root(
        M::POST,
        &format!("sys/mounts/{mount}"),
        Some(json!({ "type": "pki", "config": { "max_lease_ttl": "8760h" } })),
    )
    .await?;
    let csr = bao
        .root(
            M::POST,
            &format!("{mount}/intermediate/generate/internal"),
            Some(json!({ "common_name": format!("{mount} intermediate") })),
        )
        .await?["data"]["csr"]
        .as_str()
        .ok_or_else(|| anyhow!("no intermediate CSR"))?
        .to_string();
    let int_pem = bao
        .root(
            M::POST,
            &format!("{PKI_MOUNT}/root/sign-intermediate"),
            Some(json!({ "csr": csr, "format": "pem", "ttl": "4000h" })),
        )
        .await?["data"]["certificate"]
        .as_str()
        .ok_or_else(|| anyhow!("no intermediate certificate"))?
        .to_string();
    let set = bao
        .root(
            M::POST,
            &format!("{mount}/intermediate/set-signed"),
            Some(json!({ "certificate": int_pem })),
        )
        .await?;
    let int_id = set["data"]["imported_issuers"][0]
        .as_str()
        .ok_or_else(|| anyhow!("no imported issuer"))?
        .to_string();
    if with_root {
        let url = format!("{}/v1/{PKI_MOUNT}/ca/pem", bao.addr());
        let root = bao.client().get(url).send().await?.text().await?;
        bao.root(
            M::POST,
            &format!("{mount}/issuers/import/cert"),
            Some(json!({ "pem_bundle": root })),
        )
        .await?;
    }
    if chain_self {
        bao.root(
            M::POST,
            &format!("{mount}/issuer/{int_id}"),
            Some(json!({ "manual_chain": ["self"] })),
        )
        .await?;
    }
    bao.root(
        M::POST,
        &format!("{mount}/roles/{PKI_ROLE}"),
        Some(json!({
            "allow_any_name": true,
            "require_cn": false,
            "allowed_uri_sans": ["spiffe://*"],
            "use_csr_sans": true,
            "use_csr_common_name": false,
            "enforce_hostnames": false,
            "key_type": "any",
            "basic_constraints_valid_for_non_ca": true,
            "ttl": "1h",
        })),
    )
    .await?;
    // The tutorial's token policy may sign with the role of any mount.
    bao.root(
        M::POST,
        &format!("sys/policies/acl/{POLICY}"),
        Some(json!({
            "policy": format!(
                "path \"+/sign/{PKI_ROLE}\" {{\n  capabilities = [\"create\", \"update\"]\n}}\n"
            )
        })),
    )
    .await?;
    Ok(int_pem)
}

/// Proxy state, see [`ToggleProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward connections to the target.
    Up,
    /// Listener closed (connect gets ECONNREFUSED); open connections cut.
    Down,
    /// Accept connections but never answer (a black hole, for timeouts);
    /// open connections are cut.
    Hang,
}

/// A loopback TCP proxy that can refuse, black-hole or forward connections,
/// to simulate Vault being down without losing dev-mode state. TLS passes
/// through untouched; the dev-tls certificate is valid for 127.0.0.1 on any
/// port.
pub struct ToggleProxy {
    addr: SocketAddr,
    mode: watch::Sender<(u64, ProxyMode)>,
    applied: watch::Receiver<u64>,
    connections: Arc<AtomicU64>,
    /// Connections held in `Hang` mode on which the client began a request.
    hung: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl ToggleProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `target`;
    /// returns once `mode` is in effect.
    pub async fn start(target: SocketAddr, mode: ProxyMode) -> anyhow::Result<Self> {
        let port = super::ports::free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let (tx, rx) = watch::channel((0, mode));
        let (applied_tx, applied) = watch::channel(u64::MAX);
        let connections = Arc::new(AtomicU64::new(0));
        let hung = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run_proxy(
            addr,
            target,
            rx,
            applied_tx,
            connections.clone(),
            hung.clone(),
        ));
        let proxy = Self {
            addr,
            mode: tx,
            applied,
            connections,
            hung,
            task,
        };
        proxy.wait_applied(0).await?;
        Ok(proxy)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`, to give the agent as Vault address.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Switches mode; returns once the listener is bound or closed, so the
    /// next connect already sees the new mode. Open connections are cut
    /// asynchronously, within milliseconds.
    pub async fn set_mode(&self, mode: ProxyMode) {
        let mut generation = 0;
        self.mode.send_modify(|(g, m)| {
            *g += 1;
            *m = mode;
            generation = *g;
        });
        let _ = self.wait_applied(generation).await;
    }

    /// `true` forwards; `false` refuses new and cuts existing connections.
    pub async fn set_up(&self, up: bool) {
        self.set_mode(if up { ProxyMode::Up } else { ProxyMode::Down })
            .await;
    }

    async fn wait_applied(&self, generation: u64) -> anyhow::Result<()> {
        let mut rx = self.applied.clone();
        let done = rx.wait_for(|g| *g != u64::MAX && *g >= generation);
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(5), done).await,
            Ok(Ok(_))
        );
        if !ok {
            bail!("proxy could not apply its mode (port taken?)");
        }
        Ok(())
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests left hanging so far: connections accepted in `Hang` mode on
    /// which the client sent its first bytes (for TLS, its ClientHello) and
    /// got no answer.
    pub fn hung_requests(&self) -> u64 {
        self.hung.load(Ordering::SeqCst)
    }
}

impl Drop for ToggleProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    // Lets the port be re-bound at once after going Down -> Up.
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(128)
}

async fn run_proxy(
    addr: SocketAddr,
    target: SocketAddr,
    mut rx: watch::Receiver<(u64, ProxyMode)>,
    applied: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
    hung: Arc<AtomicU64>,
) {
    let mut listener = None;
    loop {
        let (generation, mode) = *rx.borrow_and_update();
        if mode == ProxyMode::Down {
            listener = None;
        } else if listener.is_none() {
            match bind(addr) {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        applied.send_replace(generation);
        let Some(l) = &listener else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            accepted = l.accept() => {
                let Ok((inbound, _)) = accepted else { continue };
                let rx = rx.clone();
                if mode == ProxyMode::Up {
                    connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(forward(inbound, target, rx));
                } else {
                    tokio::spawn(hold(inbound, rx, hung.clone()));
                }
            }
        }
    }
}

/// Copies both ways until either side closes or the mode leaves `Up`.
async fn forward(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut rx: watch::Receiver<(u64, ProxyMode)>,
) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = rx.wait_for(|(_, m)| *m != ProxyMode::Up) => {}
    }
}

/// Keeps a connection open, silent, until the mode leaves `Hang`; counts it
/// in `hung` once the client has sent something.
async fn hold(
    mut inbound: TcpStream,
    mut rx: watch::Receiver<(u64, ProxyMode)>,
    hung: Arc<AtomicU64>,
) {
    use tokio::io::AsyncReadExt;
    let mut counted = false;
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            _ = rx.wait_for(|(_, m)| *m != ProxyMode::Hang) => return,
            n = inbound.read(&mut buf) => match n {
                Ok(n) if n > 0 => {
                    if !counted {
                        counted = true;
                        hung.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // Closed by the client: nothing more to hold.
                _ => return,
            },
        }
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

//! A fake Kubernetes control plane for tests: a service-account token issuer
//! (RS256 JWTs shaped like real projected and legacy tokens) and a TokenReview
//! endpoint that really verifies them, so Vault/OpenBao's `kubernetes` auth
//! method can be exercised without a cluster.
//!
//! Nothing here uses test-only macros, so the same code can back a standalone
//! example binary (see [`serve_forever`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use rsa::pkcs1v15::Pkcs1v15Sign;
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// `iss` of projected tokens on a default kubeadm/kind cluster.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Default `aud` of projected tokens, and the API server's own audience.
pub const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// `iss` of legacy (Secret-based) service-account tokens.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";
/// Path of the TokenReview API.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// DER prefix of the PKCS#1 v1.5 `DigestInfo` for SHA-256. Spelled out so the
/// `rsa` crate does not need its `sha2` feature (only `pem` is required).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

fn rs256_scheme() -> Pkcs1v15Sign {
    Pkcs1v15Sign {
        hash_len: Some(32),
        prefix: SHA256_DIGEST_INFO.to_vec().into_boxed_slice(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs()
}

/// Deterministic UUID-shaped id, so the uid in a token and the uid the
/// TokenReview answers with always agree without shared state.
pub fn fake_uid(kind: &str, ns: &str, name: &str) -> String {
    let h = Sha256::digest(format!("{kind}/{ns}/{name}").as_bytes());
    let x: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Pod name used in minted tokens for a service account.
pub fn fake_pod_name(sa: &str) -> String {
    format!("{sa}-7d9f8b6c5-x2k4q")
}

/// The service-account token signer (the API server's `--service-account-key-file`).
pub struct TestIssuer {
    key: RsaPrivateKey,
    public: RsaPublicKey,
    kid: String,
    /// `iss` claim of projected tokens.
    pub issuer: String,
    /// `aud` claim of projected tokens minted by [`TestIssuer::mint`].
    pub audiences: Vec<String>,
}

impl TestIssuer {
    /// Generates a fresh RSA-2048 key. Costs ~0.1–1 s with optimised
    /// dependencies and several seconds (up to ~30 s) in a plain debug
    /// build, so prefer [`TestIssuer::load_or_generate`] with a cached file
    /// or `[profile.dev.package."*"] opt-level = 2`.
    pub fn generate() -> anyhow::Result<Self> {
        let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048)?;
        Self::from_key(key)
    }

    /// Loads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        Self::from_key(RsaPrivateKey::from_pkcs8_pem(pem).context("parse issuer key")?)
    }

    /// Loads the key from `path`, or generates one and stores it there (mode
    /// 0600), so repeated test runs pay the key-generation cost once.
    pub fn load_or_generate(path: &Path) -> anyhow::Result<Self> {
        if let Ok(pem) = std::fs::read_to_string(path) {
            return Self::from_pem(&pem);
        }
        let issuer = Self::generate()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, issuer.private_key_pem()?.as_bytes())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        // Rename is atomic, so parallel test binaries never read half a key.
        std::fs::rename(&tmp, path)?;
        Ok(issuer)
    }

    fn from_key(key: RsaPrivateKey) -> anyhow::Result<Self> {
        let public = RsaPublicKey::from(&key);
        let der = public.to_public_key_der()?;
        // Kubernetes derives `kid` from a hash of the public key, as here.
        let kid = B64URL.encode(Sha256::digest(der.as_bytes()));
        Ok(Self {
            key,
            public,
            kid,
            issuer: DEFAULT_ISSUER.to_string(),
            audiences: vec![DEFAULT_AUDIENCE.to_string()],
        })
    }

    /// The private key as PKCS#8 PEM, for caching. Never log it.
    pub fn private_key_pem(&self) -> anyhow::Result<String> {
        Ok(self.key.to_pkcs8_pem(LineEnding::LF)?.to_string())
    }

    /// SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), the form that
    /// Vault's `jwt_validation_pubkeys` and [`start_token_review`] accept.
    pub fn public_key_pem(&self) -> String {
        self.public
            .to_public_key_pem(LineEnding::LF)
            .expect("encode public key")
    }

    /// The `kid` header value of every token this issuer mints.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Mints a projected service-account token (the kubelet's
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token` since 1.21) for
    /// `ns`/`sa`, valid from now for `ttl`, with this issuer's audiences.
    pub fn mint(&self, ns: &str, sa: &str, ttl: Duration) -> String {
        let auds: Vec<&str> = self.audiences.iter().map(String::as_str).collect();
        self.mint_for_audiences(ns, sa, ttl, &auds)
    }

    /// Like [`TestIssuer::mint`] with explicit `aud` values.
    pub fn mint_for_audiences(&self, ns: &str, sa: &str, ttl: Duration, aud: &[&str]) -> String {
        let now = now_secs();
        let pod = fake_pod_name(sa);
        let claims = json!({
            "aud": aud,
            "exp": now + ttl.as_secs(),
            "iat": now,
            "iss": self.issuer,
            "jti": fake_uid("jti", &format!("{now}-{}", rand::random::<u64>()), sa),
            "kubernetes.io": {
                "namespace": ns,
                "node": { "name": "node-1", "uid": fake_uid("node", "", "node-1") },
                "pod": { "name": pod, "uid": fake_uid("pod", ns, &pod) },
                "serviceaccount": { "name": sa, "uid": fake_uid("sa", ns, sa) },
            },
            "nbf": now,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        });
        self.sign(&claims)
    }

    /// Mints a legacy Secret-based token (pre-1.24 shape): no `exp`, `aud`
    /// or `nbf`, and flat `kubernetes.io/serviceaccount/*` claims.
    pub fn mint_legacy(&self, ns: &str, sa: &str) -> String {
        let claims = json!({
            "iss": LEGACY_ISSUER,
            "kubernetes.io/serviceaccount/namespace": ns,
            "kubernetes.io/serviceaccount/secret.name": format!("{sa}-token-abcde"),
            "kubernetes.io/serviceaccount/service-account.name": sa,
            "kubernetes.io/serviceaccount/service-account.uid": fake_uid("sa", ns, sa),
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        });
        self.sign(&claims)
    }

    /// Signs arbitrary claims with RS256, for tests that need odd tokens.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({ "alg": "RS256", "kid": self.kid, "typ": "JWT" });
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let digest = Sha256::digest(signing_input.as_bytes());
        let sig = self
            .key
            .sign(rs256_scheme(), &digest)
            .expect("RSA signing cannot fail for a valid key");
        format!("{signing_input}.{}", B64URL.encode(sig))
    }
}

/// Decodes a JWT's claims WITHOUT verifying it (for assertions in tests).
pub fn decode_claims_unverified(token: &str) -> anyhow::Result<Value> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow!("not a JWT"))?;
    Ok(serde_json::from_slice(&B64URL.decode(payload)?)?)
}

/// Verifies an RS256 JWT's signature and its `exp`/`nbf` (60 s leeway, like
/// the API server) and returns its claims.
pub fn verify_rs256(token: &str, key: &RsaPublicKey) -> anyhow::Result<Value> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed JWT");
    };
    let header: Value = serde_json::from_slice(&B64URL.decode(h).context("bad header")?)?;
    if header["alg"] != "RS256" {
        bail!("unexpected signing algorithm");
    }
    let sig = B64URL.decode(s).context("bad signature encoding")?;
    let digest = Sha256::digest(format!("{h}.{p}").as_bytes());
    key.verify(rs256_scheme(), &digest, &sig)
        .map_err(|_| anyhow!("invalid signature"))?;
    let claims: Value = serde_json::from_slice(&B64URL.decode(p).context("bad payload")?)?;
    let now = now_secs();
    const LEEWAY: u64 = 60;
    if let Some(exp) = claims["exp"].as_u64() {
        if now > exp + LEEWAY {
            bail!("token has expired");
        }
    }
    if let Some(nbf) = claims["nbf"].as_u64() {
        if now + LEEWAY < nbf {
            bail!("token used before issued");
        }
    }
    Ok(claims)
}

/// Counters and switches shared between a TokenReview server and its owner.
#[derive(Default)]
pub struct ReviewStats {
    /// Every TokenReview request received.
    pub reviews: AtomicU64,
    /// Reviews answered `authenticated: true`.
    pub authenticated: AtomicU64,
    /// When set, answers 503 like an unreachable API server.
    pub fail: AtomicBool,
    /// Tokens whose pod was deleted: reviewed as not authenticated, as the
    /// API server does for a token bound to an object that is gone.
    pub revoked: std::sync::Mutex<Vec<String>>,
}

/// Running TokenReview server; stops when dropped.
pub struct TokenReviewHandle {
    addr: SocketAddr,
    stats: Arc<ReviewStats>,
    task: JoinHandle<()>,
}

impl TokenReviewHandle {
    /// `http://127.0.0.1:PORT`, the value for Vault's `kubernetes_host`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of TokenReview requests received so far.
    pub fn reviews(&self) -> u64 {
        self.stats.reviews.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> &Arc<ReviewStats> {
        &self.stats
    }

    /// Makes the server answer 503 (true) or review normally (false).
    pub fn set_failing(&self, fail: bool) {
        self.stats.fail.store(fail, Ordering::SeqCst);
    }

    /// From now on `token` is refused, as when the pod it is bound to is
    /// deleted.
    pub fn revoke(&self, token: &str) {
        self.stats.revoked.lock().unwrap().push(token.to_string());
    }
}

impl Drop for TokenReviewHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a TokenReview server on `127.0.0.1:port` (0 picks a free port)
/// that trusts tokens signed by `issuer_pubkey_pem` (SPKI PEM).
pub async fn start_token_review(
    issuer_pubkey_pem: &str,
    port: u16,
) -> anyhow::Result<TokenReviewHandle> {
    let key = RsaPublicKey::from_public_key_pem(issuer_pubkey_pem).context("parse issuer key")?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(ReviewStats::default());
    let task = tokio::spawn(serve(listener, Arc::new(key), stats.clone()));
    Ok(TokenReviewHandle { addr, stats, task })
}

/// Entry point for a standalone binary: serves until the process ends.
pub async fn serve_forever(issuer_pubkey_pem: &str, port: u16) -> anyhow::Result<()> {
    let key = RsaPublicKey::from_public_key_pem(issuer_pubkey_pem).context("parse issuer key")?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    serve(listener, Arc::new(key), Arc::default()).await;
    Ok(())
}

async fn serve(listener: TcpListener, key: Arc<RsaPublicKey>, stats: Arc<ReviewStats>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Answers are small single writes: without this, Nagle's algorithm
        // and the client's delayed ACK add ~40 ms to every review.
        let _ = stream.set_nodelay(true);
        let (key, stats) = (key.clone(), stats.clone());
        tokio::spawn(async move {
            let _ = handle_conn(stream, &key, &stats).await;
        });
    }
}

/// Minimal HTTP/1.1: keep-alive, Content-Length or chunked request bodies.
async fn handle_conn(
    stream: TcpStream,
    key: &RsaPublicKey,
    stats: &ReviewStats,
) -> anyhow::Result<()> {
    let mut conn = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut it = line.split_whitespace();
        let (method, path) = (
            it.next().unwrap_or("").to_string(),
            it.next().unwrap_or("").to_string(),
        );
        let (mut len, mut chunked, mut close) = (0usize, false, false);
        loop {
            let mut h = String::new();
            if conn.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => len = value.parse()?,
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let body = if chunked {
            read_chunked(&mut conn).await?
        } else {
            let mut b = vec![0; len];
            conn.read_exact(&mut b).await?;
            b
        };
        let (status, resp) = route(&method, &path, &body, key, stats);
        let resp = resp.to_string();
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            resp.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        let s = conn.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.write_all(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

async fn read_chunked(conn: &mut BufReader<TcpStream>) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        conn.read_line(&mut size).await?;
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)?;
        let mut chunk = vec![0; size + 2];
        conn.read_exact(&mut chunk).await?;
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

fn route(
    method: &str,
    path: &str,
    body: &[u8],
    key: &RsaPublicKey,
    stats: &ReviewStats,
) -> (&'static str, Value) {
    if method != "POST" || path.split('?').next() != Some(TOKEN_REVIEW_PATH) {
        return ("404 Not Found", k8s_status(404, "NotFound", "not found"));
    }
    stats.reviews.fetch_add(1, Ordering::SeqCst);
    if stats.fail.load(Ordering::SeqCst) {
        return (
            "503 Service Unavailable",
            k8s_status(503, "ServiceUnavailable", "apiserver is shutting down"),
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return ("400 Bad Request", k8s_status(400, "BadRequest", "bad body"));
    };
    let token = req["spec"]["token"].as_str().unwrap_or("");
    let requested: Vec<String> = match req["spec"]["audiences"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        // No audiences asked for: the API server checks its own.
        _ => vec![DEFAULT_AUDIENCE.to_string()],
    };
    let revoked = stats.revoked.lock().unwrap().iter().any(|t| t == token);
    let reviewed = if revoked {
        Err(anyhow::anyhow!(
            "the pod this token is bound to no longer exists"
        ))
    } else {
        review(token, &requested, key)
    };
    let status = match reviewed {
        Ok(status) => {
            stats.authenticated.fetch_add(1, Ordering::SeqCst);
            status
        }
        Err(e) => {
            json!({ "authenticated": false, "error": format!("[invalid bearer token, {e}]") })
        }
    };
    let mut resp = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": { "creationTimestamp": null },
        // The real API server echoes spec.token too; left out so a logged
        // response never carries a credential.
        "spec": {},
        "status": status,
    });
    if let Some(a) = req["spec"].get("audiences") {
        resp["spec"]["audiences"] = a.clone();
    }
    ("201 Created", resp)
}

/// What the API server does for a service-account token: verify, check the
/// audience intersection, and describe the user.
fn review(token: &str, requested: &[String], key: &RsaPublicKey) -> anyhow::Result<Value> {
    let c = verify_rs256(token, key)?;
    let (ns, sa, uid, pod, audiences);
    if c["iss"] == LEGACY_ISSUER {
        let p = "kubernetes.io/serviceaccount/";
        ns = c[format!("{p}namespace")]
            .as_str()
            .unwrap_or("")
            .to_string();
        sa = c[format!("{p}service-account.name")]
            .as_str()
            .unwrap_or("")
            .to_string();
        uid = c[format!("{p}service-account.uid")]
            .as_str()
            .unwrap_or("")
            .to_string();
        pod = None;
        // Legacy tokens are audience-agnostic: valid for whatever is asked.
        audiences = requested.to_vec();
    } else {
        let k = &c["kubernetes.io"];
        ns = k["namespace"].as_str().unwrap_or("").to_string();
        sa = k["serviceaccount"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        uid = k["serviceaccount"]["uid"]
            .as_str()
            .unwrap_or("")
            .to_string();
        pod = k.get("pod").cloned();
        let token_aud: HashSet<&str> = match &c["aud"] {
            Value::String(s) => [s.as_str()].into(),
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => HashSet::new(),
        };
        audiences = requested
            .iter()
            .filter(|a| token_aud.contains(a.as_str()))
            .cloned()
            .collect::<Vec<_>>();
        if audiences.is_empty() {
            bail!(
                "token audiences {token_aud:?} is invalid for the target audiences {requested:?}"
            );
        }
    }
    if ns.is_empty() || sa.is_empty() {
        bail!("token lacks service account claims");
    }
    let mut extra = serde_json::Map::new();
    if let Some(pod) = pod {
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            json!([pod["name"]]),
        );
        extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            json!([pod["uid"]]),
        );
    }
    if let Some(node) = c["kubernetes.io"]["node"]["name"].as_str() {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            json!([node]),
        );
    }
    if let Some(jti) = c["jti"].as_str() {
        extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            json!([format!("JTI={jti}")]),
        );
    }
    Ok(json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{ns}:{sa}"),
            "uid": uid,
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            "extra": extra,
        },
        "audiences": audiences,
    }))
}

fn k8s_status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

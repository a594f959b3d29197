//! The TokenReview endpoint (`/apis/authentication.k8s.io/v1/tokenreviews`)
//! over plain HTTP/1.1: it verifies each token's RS256 signature and claims
//! and answers as the kube-apiserver does; a test can make it fail or revoke
//! a token, and read how many reviews (so logins) reached it.

use super::verify_rs256;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use rsa::pkcs8::DecodePublicKey;
use rsa::RsaPublicKey;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{DEFAULT_AUDIENCE, LEGACY_ISSUER, TOKEN_REVIEW_PATH};

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

//! An HTTP(S) front between the agent and a real OpenBao: it forwards every
//! request, counts how many are in flight at once (HTTP/1.1 without
//! pipelining means one request per connection at a time, so the count is
//! exact), records what it saw, can slow requests down, can replace sign
//! answers with bad ones, can answer with redirects instead of forwarding,
//! and can serve HTTPS with a certificate of its own test CA.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the front does with sign requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Forward unchanged.
    None,
    /// Answer something that is not JSON.
    Garbage,
    /// Answer JSON without a certificate.
    NoCertificate,
    /// Answer a genuine certificate of the real PKI, for another key.
    OtherKey,
}

/// Answer requests with a redirect instead of forwarding them.
#[derive(Clone, Debug)]
pub struct Redirect {
    /// e.g. 307, 308, 302.
    pub status: u16,
    /// Base URL the request's path is appended to (`Location`); `None`
    /// means this front's own URL (a redirect loop).
    pub to: Option<String>,
    /// How many requests get the redirect before the front forwards again
    /// (`usize::MAX`: every one).
    pub times: usize,
    /// Only requests whose path contains this are redirected (all when `None`).
    pub only: Option<String>,
}

impl Redirect {
    /// `times` redirects with `status` to `to` (`None`: to the front itself).
    pub fn new(status: u16, to: Option<String>, times: usize) -> Self {
        Self {
            status,
            to,
            times,
            only: None,
        }
    }
}

/// How the front behaves.
#[derive(Clone, Debug)]
pub struct FrontOptions {
    pub tamper: Tamper,
    pub delay: Duration,
    pub redirect: Option<Redirect>,
    /// Serve HTTPS with a certificate for 127.0.0.1 from [`TestCa`].
    pub tls: Option<Arc<TestCa>>,
    /// Headers added to every forwarded request.
    pub forward_headers: Vec<(String, String)>,
}

impl Default for FrontOptions {
    fn default() -> Self {
        Self {
            tamper: Tamper::None,
            delay: Duration::ZERO,
            redirect: None,
            tls: None,
            forward_headers: Vec::new(),
        }
    }
}

/// One request the front received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    pub token: Option<String>,
}

/// Counters of the front.
#[derive(Default, Debug)]
pub struct FrontStats {
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub requests: AtomicUsize,
    pub redirected: AtomicUsize,
    pub seen: Mutex<Vec<Seen>>,
}

pub struct VaultFront {
    pub url: String,
    pub stats: Arc<FrontStats>,
}

/// A CA for the HTTPS front: its root goes into the agent's
/// `VAULT_TLS_ROOT_CERT`.
pub struct TestCa {
    pub root_pem: String,
    server: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

impl TestCa {
    /// A root and a server certificate for `127.0.0.1`.
    pub fn generate() -> Arc<TestCa> {
        Self::named("vault front test CA")
    }

    /// [`TestCa::generate`] with the root's common name: two CAs of one
    /// name are told apart only by their signatures.
    pub fn named(common_name: &str) -> Arc<TestCa> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use tokio_rustls::rustls;
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
        root.distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let issuer = Issuer::new(root, root_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        Arc::new(TestCa {
            root_pem: root_cert.pem(),
            server: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

impl VaultFront {
    /// Starts the front for the Vault at `bao_addr`, reached with `client`.
    pub async fn start(
        bao_addr: String,
        client: reqwest::Client,
        tamper: Tamper,
        delay: Duration,
    ) -> VaultFront {
        Self::start_with(
            bao_addr,
            client,
            FrontOptions {
                tamper,
                delay,
                ..FrontOptions::default()
            },
        )
        .await
    }

    /// Starts the front with every option. `client` should not follow
    /// redirects when Vault's own redirects are to reach the agent.
    pub async fn start_with(
        bao_addr: String,
        client: reqwest::Client,
        opts: FrontOptions,
    ) -> VaultFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if opts.tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let stats = Arc::new(FrontStats::default());
        let ctx = Arc::new(Ctx {
            bao: bao_addr,
            client,
            stats: stats.clone(),
            own_url: url.clone(),
            opts,
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    match &ctx.opts.tls {
                        Some(ca) => {
                            if let Ok(tls) = ca.server.accept(stream).await {
                                serve(tls, ctx.clone()).await;
                            }
                        }
                        None => serve(stream, ctx.clone()).await,
                    }
                });
            }
        });
        VaultFront { url, stats }
    }

    pub fn max_in_flight(&self) -> usize {
        self.stats.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.stats.requests.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.stats.seen.lock().unwrap().clone()
    }
}

struct Ctx {
    bao: String,
    client: reqwest::Client,
    stats: Arc<FrontStats>,
    own_url: String,
    opts: FrontOptions,
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(stream: S, ctx: Arc<Ctx>) {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    while let Some(seen) = read_request(&mut r).await {
        let stats = &ctx.stats;
        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        stats.requests.fetch_add(1, Ordering::SeqCst);
        stats.seen.lock().unwrap().push(seen.clone());
        tokio::time::sleep(ctx.opts.delay).await;
        let redirect = ctx.opts.redirect.as_ref().filter(|r| {
            r.only
                .as_ref()
                .is_none_or(|p| seen.path.contains(p.as_str()))
                && stats.redirected.load(Ordering::SeqCst) < r.times
        });
        let answer = match redirect {
            Some(r) => {
                stats.redirected.fetch_add(1, Ordering::SeqCst);
                let to = r.to.as_deref().unwrap_or(&ctx.own_url);
                Reply {
                    status: r.status,
                    headers: vec![("location".into(), format!("{to}{}", seen.path))],
                    body: String::new(),
                }
            }
            None => answer(&ctx, seen).await,
        };
        stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut resp = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            answer.status,
            reqwest::StatusCode::from_u16(answer.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or(""),
            answer.body.len(),
        );
        for (k, v) in &answer.headers {
            resp.push_str(&format!("{k}: {v}\r\n"));
        }
        resp.push_str("\r\n");
        resp.push_str(&answer.body);
        if w.write_all(resp.as_bytes()).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
}

/// Reads one HTTP/1.1 request.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Seen> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let (mut len, mut token) = (0usize, None);
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().ok()?,
            "x-vault-token" => token = Some(v.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    Some(Seen {
        method,
        path,
        body,
        token,
    })
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// The answer to send.
async fn answer(ctx: &Ctx, seen: Seen) -> Reply {
    let ok = |body: String| Reply {
        status: 200,
        headers: Vec::new(),
        body,
    };
    let mut body: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
    if seen.path.contains("/sign/") {
        match ctx.opts.tamper {
            Tamper::None => {}
            Tamper::Garbage => return ok("{this is not json".into()),
            Tamper::NoCertificate => {
                return ok(json!({"data": {"serial_number": "01"}}).to_string())
            }
            Tamper::OtherKey => {
                // Sign the same request for another key at the real PKI.
                let csr =
                    rcgen::CertificateSigningRequestParams::from_pem(body["csr"].as_str().unwrap())
                        .unwrap();
                let other = rcgen::KeyPair::generate().unwrap();
                body["csr"] =
                    Value::String(csr.params.serialize_request(&other).unwrap().pem().unwrap());
            }
        }
    }
    let method =
        reqwest::Method::from_bytes(seen.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut req = ctx
        .client
        .request(method, format!("{}{}", ctx.bao, seen.path));
    if !seen.body.is_empty() {
        req = req.json(&body);
    }
    if let Some(t) = seen.token {
        req = req.header("X-Vault-Token", t);
    }
    for (k, v) in &ctx.opts.forward_headers {
        req = req.header(k, v);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(|l| vec![("location".to_string(), l.to_string())])
                .unwrap_or_default();
            let body = resp.text().await.unwrap_or_default();
            Reply {
                status,
                headers,
                body,
            }
        }
        Err(e) => Reply {
            status: 502,
            headers: Vec::new(),
            body: json!({"errors": [e.to_string()]}).to_string(),
        },
    }
}

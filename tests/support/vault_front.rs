//! A plain-HTTP front between the agent and a real OpenBao: it forwards every
//! request, counts how many are in flight at once (plain HTTP/1.1 means one
//! request per connection, so the count is exact), can slow requests down,
//! and can replace sign answers with bad ones.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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

/// Counters of the front.
#[derive(Default, Debug)]
pub struct FrontStats {
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub requests: AtomicUsize,
}

pub struct VaultFront {
    pub url: String,
    pub stats: Arc<FrontStats>,
}

impl VaultFront {
    /// Starts the front for the Vault at `bao_addr`, reached with `client`.
    pub async fn start(
        bao_addr: String,
        client: reqwest::Client,
        tamper: Tamper,
        delay: Duration,
    ) -> VaultFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stats = Arc::new(FrontStats::default());
        let ctx = Arc::new((bao_addr, client, stats.clone()));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    while let Some((path, token, body)) = read_request(&mut r).await {
                        let (bao, client, stats) = (&ctx.0, &ctx.1, &ctx.2);
                        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
                        stats.requests.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        let answer = answer(bao, client, tamper, &path, token, body).await;
                        stats.in_flight.fetch_sub(1, Ordering::SeqCst);
                        let resp = format!(
                            "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                            answer.0,
                            answer.1.len(),
                            answer.1
                        );
                        if w.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        VaultFront { url, stats }
    }

    pub fn max_in_flight(&self) -> usize {
        self.stats.max_in_flight.load(Ordering::SeqCst)
    }
}

/// Reads one HTTP/1.1 request: (path, X-Vault-Token, body).
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Option<(String, Option<String>, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1)?.to_string();
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
    Some((path, token, body))
}

/// The answer to send: (status line, body).
async fn answer(
    bao: &str,
    client: &reqwest::Client,
    tamper: Tamper,
    path: &str,
    token: Option<String>,
    body: Vec<u8>,
) -> (String, String) {
    let mut body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if path.contains("/sign/") {
        match tamper {
            Tamper::None => {}
            Tamper::Garbage => return ("200 OK".into(), "{this is not json".into()),
            Tamper::NoCertificate => {
                return (
                    "200 OK".into(),
                    json!({"data": {"serial_number": "01"}}).to_string(),
                )
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
    let mut req = client.post(format!("{bao}{path}")).json(&body);
    if let Some(t) = token {
        req = req.header("X-Vault-Token", t);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            (
                format!(
                    "{} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                ),
                text,
            )
        }
        Err(e) => (
            "502 Bad Gateway".into(),
            json!({"errors": [e.to_string()]}).to_string(),
        ),
    }
}

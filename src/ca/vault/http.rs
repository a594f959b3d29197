//! Talking HTTP to Vault: requests through the client of
//! [`super::http_client`] (time-outs, the CAs trusted, the redirect policy),
//! and one place that turns Vault's answers into [`CaError`]s whose text
//! says what failed and where (Vault's own errors verbatim) and whose data
//! carries the status and the `errors` list.

use reqwest::Method;
use serde::Deserialize;

use super::http_client::{
    certificate_error, error_chain, vault_client, ClientError, ClientSpec, RefusedRedirect,
    TlsRoots,
};
use crate::ca::{CaError, CaFailure};
use crate::config::VaultConfig;

/// Largest answer read from Vault: a sign answer is a few KiB; anything this
/// big is not a Vault answer, and reading it would only cost memory.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Errors building the client.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the Vault client: {0}")]
pub struct VaultSetupError(#[from] pub ClientError);

/// Vault's base URL and namespace, and the HTTP client (cheap to clone).
#[derive(Clone)]
pub(super) struct VaultHttp {
    client: reqwest::Client,
    addr: String,
    namespace: Option<String>,
    /// What to do when Vault's TLS certificate is not trusted.
    untrusted_hint: String,
}

/// An answer with a success status.
pub(super) struct Answer {
    pub status: u16,
    pub body: String,
}

impl VaultHttp {
    pub fn new(cfg: &VaultConfig) -> Result<Self, VaultSetupError> {
        let roots = TlsRoots {
            setting: "VAULT_TLS_ROOT_CERT",
            pem: cfg.tls_root_pem.as_deref(),
            system_roots: cfg.tls_system_roots,
        };
        let client = vault_client(&ClientSpec {
            connect_timeout: cfg.connect_timeout,
            request_timeout: cfg.request_timeout,
            user_agent: concat!("node-agent/", env!("CARGO_PKG_VERSION")),
            roots,
        })?;
        Ok(Self {
            client,
            addr: cfg.addr.clone(),
            namespace: cfg.namespace.clone(),
            untrusted_hint: roots.untrusted_hint(),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `POST` returning JSON.
    pub async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, CaError> {
        let answer = self.call(Method::POST, path, token, Some(body)).await?;
        parse_json(&answer, "POST", &self.url(path))
    }

    /// `GET` returning JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, CaError> {
        let answer = self.call(Method::GET, path, None, None).await?;
        parse_json(&answer, "GET", &self.url(path))
    }

    /// `GET` returning the body as text (e.g. `/pem` endpoints).
    pub async fn get_text(&self, path: &str) -> Result<String, CaError> {
        Ok(self.call(Method::GET, path, None, None).await?.body)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.addr, path)
    }

    /// Sends one request; a non-success answer becomes a classified error
    /// whose text is Vault's own (`Error making API request. URL: POST ...
    /// Code: 403. Errors: * ...`), as Vault's Go client prints it.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, CaError> {
        let url = self.url(path);
        let mut req = self
            .client
            .request(method.clone(), &url)
            .header("X-Vault-Request", "true");
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let prefix = format!("Error making API request. URL: {method} {url}");
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Err(send_error(&prefix, &e, &self.untrusted_hint)),
        };
        let status = resp.status();
        let code = status.as_u16();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let text = match read_bounded(&mut resp).await {
            Ok(t) => t,
            Err(what) => {
                return Err(CaError::Unavailable(CaFailure::http(
                    format!("{prefix} Code: {code}. {what}"),
                    code,
                    Vec::new(),
                )))
            }
        };
        if status.is_success() {
            return Ok(Answer {
                status: code,
                body: text,
            });
        }
        if let Some(refused) = RefusedRedirect::answered(status, location.as_deref()) {
            // Only a redirect the policy stopped gets here.
            return Err(CaError::BadAnswer(CaFailure::http(
                format!("{prefix} Code: {code}. {refused}"),
                code,
                Vec::new(),
            )));
        }
        let errors = vault_errors(&text);
        let failure = CaFailure::http(
            format!(
                "{prefix} Code: {code}. Errors: {}",
                format_errors(&errors, &text)
            ),
            code,
            errors.unwrap_or_default(),
        );
        Err(classify(code, failure))
    }
}

/// Which HTTP failures are worth retrying soon. 429 (rate limited), 408 and
/// 5xx (sealed 503, a standby that cannot reach an active node 500, a
/// failing load balancer 502/504) are; 412 is what Vault answers when a
/// replica has not yet caught up with a write. Every other 4xx is a refusal
/// of the credential, token, role or path: retrying soon would not help.
/// (472/473 are not here: only `sys/health` answers them, for standbys.)
fn classify(code: u16, failure: CaFailure) -> CaError {
    if code == 429 || code == 408 || code == 412 || code >= 500 {
        CaError::Unavailable(failure)
    } else {
        CaError::Rejected(failure)
    }
}

fn send_error(prefix: &str, e: &reqwest::Error, untrusted_hint: &str) -> CaError {
    if let Some(r) = RefusedRedirect::of(e) {
        let failure = CaFailure::new(format!("{prefix}: {r}"));
        return match r {
            RefusedRedirect::TooMany { .. } => CaError::Unavailable(failure),
            _ => CaError::BadAnswer(failure),
        };
    }
    if let Some(tls) = certificate_error(e) {
        // Retried like an outage: Vault's certificate may be replaced.
        return CaError::unavailable(format!(
            "{prefix}: Vault's TLS certificate is not trusted ({tls}): {untrusted_hint}"
        ));
    }
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    CaError::unavailable(format!("{prefix} {what}: {}", error_chain(e)))
}

async fn read_bounded(resp: &mut reqwest::Response) -> Result<String, String> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(format!(
            "the answer is larger than {MAX_ANSWER_BYTES} bytes"
        ));
    }
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(format!(
                        "the answer is larger than {MAX_ANSWER_BYTES} bytes"
                    ));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(format!("reading the answer failed: {}", error_chain(&e))),
        }
    }
    String::from_utf8(buf).map_err(|_| "the answer is not UTF-8 text".to_string())
}

pub(super) fn parse_json(
    answer: &Answer,
    method: &str,
    url: &str,
) -> Result<serde_json::Value, CaError> {
    if answer.status == 204 || answer.body.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&answer.body).map_err(|e| {
        CaError::BadAnswer(CaFailure::http(
            format!(
                "Error making API request. URL: {method} {url} Code: {}. The answer is not JSON: {e}",
                answer.status
            ),
            answer.status,
            Vec::new(),
        ))
    })
}

/// Vault's `{"errors": [...]}`, or `None` when the body is not such an answer.
pub(super) fn vault_errors(body: &str) -> Option<Vec<String>> {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<String>,
    }
    serde_json::from_str::<Errors>(body).ok().map(|e| e.errors)
}

/// The errors as Vault's Go client prints them: `* a * b`; the body's start
/// when it is not a Vault answer.
fn format_errors(errors: &Option<Vec<String>>, body: &str) -> String {
    match errors {
        Some(e) if !e.is_empty() => e
            .iter()
            .map(|m| format!("* {m}"))
            .collect::<Vec<_>>()
            .join(" "),
        Some(_) => "(none given)".into(),
        None => {
            let start: String = body.chars().take(200).collect();
            format!("(not a Vault answer) {start:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_errors_are_quoted_verbatim() {
        let body = r#"{"errors":["service account name not authorized"]}"#;
        assert_eq!(
            format_errors(&vault_errors(body), body),
            "* service account name not authorized"
        );
        let body = r#"{"errors":["a","b"]}"#;
        assert_eq!(format_errors(&vault_errors(body), body), "* a * b");
        let body = "<html>bad gateway</html>";
        assert!(format_errors(&vault_errors(body), body).contains("not a Vault answer"));
    }

    #[test]
    fn status_codes_are_classified_by_what_a_retry_can_do() {
        for code in [429, 408, 412, 500, 502, 503, 504] {
            assert!(classify(code, CaFailure::new("x")).is_transient(), "{code}");
        }
        for code in [400, 401, 403, 404, 405] {
            assert!(classify(code, CaFailure::new("x")).is_rejection(), "{code}");
        }
    }
}

//! The Vault admin API as `vault-setup` uses it: reads that may find nothing,
//! writes that `--dry-run` prints instead of sending, and errors that say
//! what to do. The token travels only in the `X-Vault-Token` header; it is
//! never printed. The HTTP client is the agent's
//! ([`crate::ca::vault::http_client`]): the same redirect policy, and
//! `VAULT_CACERT` trusted instead of the system roots.

use std::fmt;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::ca::vault::http_client::{
    certificate_error, error_chain, vault_client, ClientError, ClientSpec, RefusedRedirect,
    TlsRoots,
};

/// Why `vault-setup` stopped.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The command line, the environment or a file it names cannot be used (exit 2).
    #[error("{what}: {reason}")]
    Usage { what: String, reason: String },
    /// No connection to Vault (refused, DNS, TLS, time-out).
    #[error("cannot reach Vault at {addr}: {cause}; check VAULT_ADDR{hint}")]
    Unreachable {
        addr: String,
        cause: String,
        hint: String,
    },
    /// `VAULT_TOKEN` itself was refused.
    #[error(
        "Vault at {addr} does not accept the token in VAULT_TOKEN ({status}: {errors}); \
         export a valid token (e.g. from `bao login` / `vault login`)"
    )]
    BadToken {
        addr: String,
        status: u16,
        errors: String,
    },
    /// The token is valid but may not do one of the requests.
    #[error(
        "the token in VAULT_TOKEN may not {method} /v1/{path} (Vault answered {status}: {errors}); \
         vault-setup needs a token that manages secrets engines, auth methods and ACL policies: \
         a root token, or one with the policy in docs/vault-setup.md"
    )]
    Forbidden {
        method: Method,
        path: String,
        status: u16,
        errors: String,
    },
    /// A mount exists at the path with another type.
    #[error(
        "{what} at {path}/ already exists with type {found:?}, not {wanted:?}; \
         choose another path with {flag}, or remove that mount first if it is unused"
    )]
    WrongType {
        what: &'static str,
        path: String,
        found: String,
        wanted: &'static str,
        flag: &'static str,
    },
    /// Any other refusal, with Vault's own errors.
    #[error("Vault refused {method} /v1/{path} ({status}: {errors})")]
    Refused {
        method: Method,
        path: String,
        status: u16,
        errors: String,
    },
    /// Vault (or something before it) answered a redirect that is not
    /// followed; nothing was sent where it points.
    #[error("{method} /v1/{path} at {addr}: {refused}")]
    Redirected {
        addr: String,
        method: Method,
        path: String,
        refused: Box<RefusedRedirect>,
    },
    /// Vault answered something that cannot be used.
    #[error("Vault answered {method} /v1/{path} with {detail}")]
    BadAnswer {
        method: Method,
        path: String,
        detail: String,
    },
    /// A setting Vault holds stops the setup (e.g. a CA bundle whose issuer
    /// cannot be found after import).
    #[error("{0}")]
    Conflict(String),
}

impl SetupError {
    pub(crate) fn usage(what: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::Usage {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// 2 for an unusable command line or file, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            SetupError::Usage { .. } => 2,
            _ => 1,
        }
    }

    /// The HTTP status Vault answered, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            SetupError::BadToken { status, .. }
            | SetupError::Forbidden { status, .. }
            | SetupError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where to send requests, and how.
pub struct VaultAdmin {
    addr: String,
    token: Zeroizing<String>,
    namespace: Option<String>,
    http: reqwest::Client,
    /// What to do when Vault's TLS certificate is not trusted.
    untrusted_hint: String,
    dry_run: bool,
}

/// The answer to a write: Vault's JSON, or nothing when `--dry-run` kept it.
pub enum Written {
    Sent(Value),
    DryRun,
}

impl VaultAdmin {
    /// `addr` without a trailing slash; `roots`: the CAs trusted for Vault's TLS.
    pub fn new(
        addr: String,
        token: Zeroizing<String>,
        namespace: Option<String>,
        roots: TlsRoots<'_>,
        dry_run: bool,
    ) -> Result<Self, SetupError> {
        let http = vault_client(&ClientSpec {
            connect_timeout: std::time::Duration::from_secs(10),
            request_timeout: std::time::Duration::from_secs(60),
            user_agent: concat!("node-agent-vault-setup/", env!("CARGO_PKG_VERSION")),
            roots,
        })
        .map_err(|e| match e {
            ClientError::BadRoot { setting, reason } => SetupError::usage(setting, reason),
            e @ ClientError::Build(_) => SetupError::usage(roots.setting, e),
        })?;
        Ok(Self {
            addr,
            token,
            namespace,
            http,
            untrusted_hint: roots.untrusted_hint(),
            dry_run,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// Checks that Vault answers and accepts the token (every valid token
    /// may look itself up).
    pub async fn check_token(&self) -> Result<(), SetupError> {
        let path = "auth/token/lookup-self";
        if self.dry_run {
            eprintln!("    GET /v1/{path}");
        }
        match self.send(Method::GET, path, None).await? {
            (s, _) if s.is_success() => Ok(()),
            (s, body) if s == StatusCode::FORBIDDEN || s == StatusCode::UNAUTHORIZED => {
                Err(SetupError::BadToken {
                    addr: self.addr.clone(),
                    status: s.as_u16(),
                    errors: vault_errors(&body),
                })
            }
            (s, body) => Err(self.refused(Method::GET, path, s, &body)),
        }
    }

    /// GET `path`; `None` when Vault has nothing there (404).
    pub async fn read(&self, path: &str) -> Result<Option<Value>, SetupError> {
        self.read_with(Method::GET, path).await
    }

    /// LIST `path`: its `data.keys` and `data.key_info`; `None` when empty (404).
    pub async fn list(&self, path: &str) -> Result<Option<Value>, SetupError> {
        let list = Method::from_bytes(b"LIST").expect("LIST is a valid method");
        self.read_with(list, path).await
    }

    async fn read_with(&self, method: Method, path: &str) -> Result<Option<Value>, SetupError> {
        if self.dry_run {
            eprintln!("    {method} /v1/{path}");
        }
        let (status, body) = self.send(method.clone(), path, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.refused(method, path, status, &body));
        }
        parse_json(&body)
            .map(Some)
            .map_err(|detail| SetupError::BadAnswer {
                method,
                path: path.to_string(),
                detail,
            })
    }

    /// POSTs `body`; with `--dry-run`, prints `shown` (the body with secrets
    /// redacted) instead and sends nothing.
    pub async fn write(
        &self,
        path: &str,
        body: &Value,
        shown: &Value,
    ) -> Result<Written, SetupError> {
        if self.dry_run {
            eprintln!("    would POST /v1/{path} {shown}");
            return Ok(Written::DryRun);
        }
        let (status, text) = self.send(Method::POST, path, Some(body)).await?;
        if !status.is_success() {
            return Err(self.refused(Method::POST, path, status, &text));
        }
        if text.trim().is_empty() {
            return Ok(Written::Sent(Value::Null));
        }
        parse_json(&text)
            .map(Written::Sent)
            .map_err(|detail| SetupError::BadAnswer {
                method: Method::POST,
                path: path.to_string(),
                detail,
            })
    }

    fn refused(&self, method: Method, path: &str, status: StatusCode, body: &str) -> SetupError {
        let errors = vault_errors(body);
        let (path, status) = (path.to_string(), status.as_u16());
        if status == 403 {
            SetupError::Forbidden {
                method,
                path,
                status,
                errors,
            }
        } else {
            SetupError::Refused {
                method,
                path,
                status,
                errors,
            }
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, String), SetupError> {
        let url = format!("{}/v1/{path}", self.addr);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("X-Vault-Token", self.token.as_str())
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable = |e: reqwest::Error| {
            if let Some(refused) = RefusedRedirect::of(&e) {
                return SetupError::Redirected {
                    addr: self.addr.clone(),
                    method: method.clone(),
                    path: path.to_string(),
                    refused: Box::new(refused.clone()),
                };
            }
            let cause = error_chain(&e);
            SetupError::Unreachable {
                addr: self.addr.clone(),
                hint: if let Some(tls) = certificate_error(&e) {
                    format!(
                        " and VAULT_CACERT: Vault's TLS certificate is not trusted ({tls}): {}",
                        self.untrusted_hint
                    )
                } else if e.is_timeout() {
                    " and that nothing between here and Vault drops the connection".into()
                } else {
                    " (is Vault running and listening there?)".into()
                },
                cause,
            }
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        if let Some(refused) = RefusedRedirect::answered(status, location.as_deref()) {
            // Only a redirect the policy stopped gets here.
            return Err(SetupError::Redirected {
                addr: self.addr.clone(),
                method: method.clone(),
                path: path.to_string(),
                refused: Box::new(refused),
            });
        }
        let text = resp.text().await.map_err(unreachable)?;
        Ok((status, text))
    }
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| {
        let start: String = text.chars().take(120).collect();
        format!("an answer that is not JSON ({e}): {start:?}")
    })
}

/// Vault's `{"errors": [...]}` joined with "; ", or the start of the body.
pub fn vault_errors(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) => match v["errors"].as_array() {
            Some(errs) if !errs.is_empty() => errs
                .iter()
                .map(|e| crate::cli::one_line(e.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("; "),
            _ => "no error text".into(),
        },
        Err(_) => {
            let start: String = body.chars().take(120).collect();
            format!("not a Vault answer: {:?}", crate::cli::one_line(&start))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_errors_are_quoted_on_one_line() {
        assert_eq!(
            vault_errors(r#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#),
            "1 error occurred: * permission denied"
        );
        assert_eq!(vault_errors(r#"{"errors":[]}"#), "no error text");
        assert!(vault_errors("<html>").starts_with("not a Vault answer"));
    }

    #[test]
    fn usage_errors_exit_2_others_1() {
        assert_eq!(SetupError::usage("--max-ttl", "bad").exit_code(), 2);
        let e = SetupError::Forbidden {
            method: Method::GET,
            path: "sys/mounts".into(),
            status: 403,
            errors: "permission denied".into(),
        };
        assert_eq!((e.exit_code(), e.status()), (1, Some(403)));
        assert!(e.to_string().contains("docs/vault-setup.md"), "{e}");
    }
}

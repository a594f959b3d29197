//! The one place where an HTTP client for Vault is built, for the agent
//! ([`super::http::VaultHttp`]) and for `vault-setup`
//! (`crate::cli::vault_setup`): its time-outs, the CAs it trusts for Vault's
//! TLS, its redirect policy and its user agent. Whatever talks to Vault goes
//! through [`vault_client`], so that none follows a redirect the others
//! would refuse.
//!
//! **Redirects.** Vault's standbys answer `307 Temporary Redirect` to the
//! active node when they cannot forward a request (forwarding off, the
//! active node just died). Those, and `308`, are followed, at most
//! [`MAX_REDIRECTS`] times, keeping the method, the body (a JWT, a CA key
//! bundle) and `X-Vault-Token`, which the active node needs, as Vault's own
//! client does. Nothing else is followed:
//! - a redirect from `https://` to `http://` would send the token and the
//!   body in clear text, so it fails the request ([`RefusedRedirect::Insecure`]);
//! - a `301`/`302`/`303` would turn a POST into a GET without its body (and
//!   reqwest's default would send the token to wherever it points): it is
//!   handed back as an answer, which the caller refuses with
//!   [`RefusedRedirect::NotTemporary`].
//!
//! **TLS roots.** When a CA file is given (`VAULT_TLS_ROOT_CERT`,
//! `VAULT_CACERT`), only its CAs are trusted for Vault's TLS, as the Vault
//! CLI and Istio do: a certificate any public or corporate CA of the host
//! issued for Vault's name is then refused. `VAULT_TLS_SYSTEM_ROOTS=true`
//! trusts the system roots too. With no CA file, the system roots are
//! trusted (rustls-native-certs: the OS store, or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR` when set).

use std::time::Duration;

use reqwest::StatusCode;

use crate::crypto::split_pem_certs;

/// Most redirects followed for one request (a standby to the active node,
/// plus one more while a new active node is being elected).
pub const MAX_REDIRECTS: usize = 2;

/// The setting that adds the system roots to the CA file's.
pub const SYSTEM_ROOTS_SETTING: &str = "VAULT_TLS_SYSTEM_ROOTS";

/// How long connections stay in the pool unused.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a Vault client is built from.
#[derive(Debug, Clone)]
pub struct ClientSpec<'a> {
    pub connect_timeout: Duration,
    /// Time-out for one whole request, redirects included.
    pub request_timeout: Duration,
    /// e.g. `node-agent/0.1.0`.
    pub user_agent: &'static str,
    pub roots: TlsRoots<'a>,
}

/// The CAs trusted for Vault's TLS certificate.
#[derive(Debug, Clone, Copy)]
pub struct TlsRoots<'a> {
    /// The setting `pem` was read from, named in errors and hints
    /// (`VAULT_TLS_ROOT_CERT`, `VAULT_CACERT`).
    pub setting: &'static str,
    /// PEM certificates. When given, they replace the system roots...
    pub pem: Option<&'a str>,
    /// ...unless this is true. Ignored without `pem` (the system roots are
    /// then the only ones).
    pub system_roots: bool,
}

impl TlsRoots<'_> {
    /// Whether the system roots are trusted.
    pub fn trusts_system_roots(&self) -> bool {
        self.pem.is_none() || self.system_roots
    }

    /// What to do when Vault's TLS certificate is not trusted.
    pub fn untrusted_hint(&self) -> String {
        let setting = self.setting;
        match (self.pem, self.system_roots) {
            (None, _) => format!(
                "no system root issued it: set {setting} to the CA that issued Vault's certificate"
            ),
            (Some(_), false) => format!(
                "only the CAs in {setting} are trusted, not the system roots: set {setting} to the CA \
                 that issued Vault's certificate, or {SYSTEM_ROOTS_SETTING}=true to trust the system \
                 roots too"
            ),
            (Some(_), true) => format!(
                "neither a CA in {setting} nor a system root issued it: set {setting} to the CA that \
                 issued Vault's certificate"
            ),
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA file holds something that is not a usable certificate.
    #[error("{setting}: {reason}")]
    BadRoot {
        setting: &'static str,
        reason: String,
    },
    /// reqwest refused the configuration (e.g. no usable system root).
    #[error("cannot build the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// The HTTP client for Vault described in the module documentation.
pub fn vault_client(spec: &ClientSpec<'_>) -> Result<reqwest::Client, ClientError> {
    let roots = spec.roots;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(spec.connect_timeout)
        .timeout(spec.request_timeout)
        .user_agent(spec.user_agent)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .redirect(redirect_policy())
        .tls_built_in_root_certs(roots.trusts_system_roots());
    if let Some(pem) = roots.pem {
        let bad = |reason: String| ClientError::BadRoot {
            setting: roots.setting,
            reason,
        };
        for cert in split_pem_certs(pem).map_err(|e| bad(e.to_string()))? {
            let c =
                reqwest::Certificate::from_pem(cert.as_bytes()).map_err(|e| bad(e.to_string()))?;
            builder = builder.add_root_certificate(c);
        }
    }
    builder.build().map_err(ClientError::Build)
}

/// A redirect that is not followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusedRedirect {
    /// From `https://` to `http://`.
    Insecure {
        status: u16,
        from: String,
        to: String,
    },
    /// More than [`MAX_REDIRECTS`] in a row.
    TooMany { to: String },
    /// A `301`/`302`/`303` (or another 3xx that is not `307`/`308`),
    /// handed back as an answer.
    NotTemporary { status: u16, to: String },
}

impl std::fmt::Display for RefusedRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefusedRedirect::Insecure { status, from, to } => write!(
                f,
                "Vault redirected {from} to {to} ({status}): not followed, because a redirect from \
                 https to http would send the Vault token and the request's body in clear text; check \
                 the api_addr of Vault's nodes (it must be https://)"
            ),
            RefusedRedirect::TooMany { to } => write!(
                f,
                "more than {MAX_REDIRECTS} redirects (the last to {to}); Vault may be electing a new \
                 active node"
            ),
            RefusedRedirect::NotTemporary { status, to } => write!(
                f,
                "Vault answered a {status} redirect to {to}, which is not followed: only 307/308 \
                 redirects (from a standby) keep the request intact; set VAULT_ADDR to the address \
                 Vault serves"
            ),
        }
    }
}

impl std::error::Error for RefusedRedirect {}

impl RefusedRedirect {
    /// The redirect a failed request was refused for, if that is why it failed.
    pub fn of(e: &reqwest::Error) -> Option<&RefusedRedirect> {
        sources(e).find_map(|s| s.downcast_ref::<RefusedRedirect>())
    }

    /// A redirect answer the policy handed back, or `None` when `status` is
    /// not a redirect.
    pub fn answered(status: StatusCode, location: Option<&str>) -> Option<RefusedRedirect> {
        status
            .is_redirection()
            .then(|| RefusedRedirect::NotTemporary {
                status: status.as_u16(),
                to: location.unwrap_or("(no Location)").to_string(),
            })
    }
}

/// The redirect policy described in the module documentation.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let status = attempt.status();
        if status != StatusCode::TEMPORARY_REDIRECT && status != StatusCode::PERMANENT_REDIRECT {
            // Handed back as an answer, refused by the caller.
            return attempt.stop();
        }
        let to = attempt.url().to_string();
        let previous = attempt.previous();
        let from = previous.last().map(|u| u.to_string()).unwrap_or_default();
        if previous.iter().any(|u| u.scheme() == "https") && attempt.url().scheme() != "https" {
            return attempt.error(RefusedRedirect::Insecure {
                status: status.as_u16(),
                from,
                to,
            });
        }
        if previous.len() > MAX_REDIRECTS {
            return attempt.error(RefusedRedirect::TooMany { to });
        }
        tracing::debug!(from = %from, to = %to, status = status.as_u16(), "following Vault's redirect");
        attempt.follow()
    })
}

/// The TLS error of a request that failed because Vault's certificate was
/// not accepted (unknown issuer, expired, wrong name...), if that is why.
pub fn certificate_error(e: &reqwest::Error) -> Option<&rustls::Error> {
    sources(e)
        .find_map(rustls_error)
        .filter(|tls| matches!(tls, rustls::Error::InvalidCertificate(_)))
}

/// The rustls error `e` is or wraps. The TLS connector wraps it in an
/// `io::Error`, and that again in another; an `io::Error`'s `source()`
/// skips the error it wraps, so each is opened with `get_ref()`.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}

/// `e` and its sources, outermost first.
fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// `e` and its sources as one line, each cause once.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    for inner in sources(e).skip(1) {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n";

    fn spec(pem: Option<&str>) -> ClientSpec<'_> {
        ClientSpec {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            user_agent: "test",
            roots: TlsRoots {
                setting: "VAULT_CACERT",
                pem,
                system_roots: false,
            },
        }
    }

    #[test]
    fn a_bad_ca_file_is_refused_naming_its_setting() {
        match vault_client(&spec(Some(PEM))) {
            Err(ClientError::BadRoot { setting, .. }) => assert_eq!(setting, "VAULT_CACERT"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_ca_file_replaces_the_system_roots_unless_they_are_added_back() {
        let mut roots = spec(Some(PEM)).roots;
        assert!(!roots.trusts_system_roots());
        assert!(roots
            .untrusted_hint()
            .contains("VAULT_TLS_SYSTEM_ROOTS=true"));
        roots.system_roots = true;
        assert!(roots.trusts_system_roots());
        roots.pem = None;
        roots.system_roots = false;
        assert!(
            roots.trusts_system_roots(),
            "without a CA file, the system roots"
        );
    }

    #[test]
    fn a_certificate_error_is_found_inside_the_io_errors_wrapping_it() {
        use std::io::{Error, ErrorKind};
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = Error::other(Error::new(ErrorKind::InvalidData, tls.clone()));
        assert_eq!(rustls_error(&wrapped), Some(&tls));
        assert_eq!(rustls_error(&Error::other("no TLS here")), None);
    }

    #[test]
    fn only_redirect_answers_are_refused_answers() {
        assert_eq!(
            RefusedRedirect::answered(StatusCode::FOUND, Some("http://x/v1/a")),
            Some(RefusedRedirect::NotTemporary {
                status: 302,
                to: "http://x/v1/a".into()
            })
        );
        assert_eq!(RefusedRedirect::answered(StatusCode::OK, None), None);
    }
}

//! Reading one foreign trust domain's bundle from where it is published: a
//! SPIFFE bundle endpoint (`https_web` or `https_spiffe`) or a file. Every
//! read is bounded in size and time; what it returns is checked by the
//! caller.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use super::spiffe_tls::SpiffeServerVerifier;
use crate::config::BundleSource;
use crate::crypto::pem_to_der;

/// Longest a bundle endpoint may take to answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a bundle could not be read (the last good one is kept).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot set up the client for {url}: {reason}")]
    Setup { url: String, reason: String },
    #[error("GET {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("GET {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{what} is larger than {max} bytes (FEDERATION_MAX_BUNDLE_BYTES)")]
    TooLarge { what: String, max: usize },
    #[error("cannot read {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// One domain's source, ready to read.
pub struct Source {
    kind: Kind,
    max_bytes: usize,
}

enum Kind {
    Http {
        url: String,
        client: reqwest::Client,
    },
    File {
        path: PathBuf,
    },
}

/// The roots an `https_spiffe` endpoint's certificate is checked against;
/// the domain's task replaces them with each bundle it accepts.
pub type EndpointRoots = Arc<RwLock<Vec<CertificateDer<'static>>>>;

impl Source {
    /// Builds the client for `source`. For `https_spiffe`, `endpoint_roots`
    /// starts as the bootstrap bundle read here.
    pub fn new(
        source: &BundleSource,
        max_bytes: usize,
        endpoint_roots: &EndpointRoots,
    ) -> Result<Self, FetchError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(FETCH_TIMEOUT)
                .timeout(FETCH_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                // A read every FEDERATION_REFRESH_MIN or longer: a new
                // connection each time, whose server is checked anew.
                .pool_max_idle_per_host(0)
                .user_agent(concat!("node-agent/", env!("CARGO_PKG_VERSION")))
        };
        let kind = match source {
            BundleSource::File { path } => Kind::File { path: path.clone() },
            BundleSource::HttpsWeb { url, ca_file } => {
                let setup = |reason: String| FetchError::Setup {
                    url: url.clone(),
                    reason,
                };
                let mut b = builder();
                if let Some(path) = ca_file {
                    let pem = std::fs::read_to_string(path)
                        .map_err(|e| setup(format!("ca_file {}: {e}", path.display())))?;
                    let ders = pem_to_der(&pem)
                        .map_err(|e| setup(format!("ca_file {}: {e}", path.display())))?;
                    b = b.tls_built_in_root_certs(false);
                    for der in ders {
                        let cert = reqwest::Certificate::from_der(&der)
                            .map_err(|e| setup(format!("ca_file {}: {e}", path.display())))?;
                        b = b.add_root_certificate(cert);
                    }
                }
                Kind::Http {
                    url: url.clone(),
                    client: b.build().map_err(|e| setup(e.to_string()))?,
                }
            }
            BundleSource::HttpsSpiffe {
                url,
                endpoint_spiffe_id,
                bootstrap_bundle,
            } => {
                let setup = |reason: String| FetchError::Setup {
                    url: url.clone(),
                    reason,
                };
                let bytes = read_file(bootstrap_bundle, max_bytes)?;
                let roots = super::roots_of(&bytes).map_err(|e| {
                    setup(format!(
                        "bootstrap_bundle {}: {e}",
                        bootstrap_bundle.display()
                    ))
                })?;
                *endpoint_roots.write().unwrap() =
                    roots.into_iter().map(CertificateDer::from).collect();
                let verifier =
                    SpiffeServerVerifier::new(endpoint_spiffe_id.clone(), endpoint_roots.clone());
                let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| setup(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
                // Every connection checks the endpoint's SVID against the
                // roots of now: a resumed session would skip that check.
                tls.resumption = rustls::client::Resumption::disabled();
                Kind::Http {
                    url: url.clone(),
                    client: builder()
                        .use_preconfigured_tls(tls)
                        .build()
                        .map_err(|e| setup(e.to_string()))?,
                }
            }
        };
        Ok(Self { kind, max_bytes })
    }

    /// Reads the bundle's bytes, at most `FEDERATION_MAX_BUNDLE_BYTES`.
    pub async fn read(&self) -> Result<Vec<u8>, FetchError> {
        match &self.kind {
            // A local file of bounded size, read where it is asked for.
            Kind::File { path } => read_file(path, self.max_bytes),
            Kind::Http { url, client } => {
                let req = |reason: String| FetchError::Request {
                    url: url.clone(),
                    reason,
                };
                let mut resp = client
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| req(error_chain(&e)))?;
                if !resp.status().is_success() {
                    return Err(FetchError::Status {
                        url: url.clone(),
                        status: resp.status().as_u16(),
                    });
                }
                let too_large = || FetchError::TooLarge {
                    what: format!("the answer of {url}"),
                    max: self.max_bytes,
                };
                if resp
                    .content_length()
                    .is_some_and(|n| n > self.max_bytes as u64)
                {
                    return Err(too_large());
                }
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(|e| req(error_chain(&e)))? {
                    if body.len() + chunk.len() > self.max_bytes {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
        }
    }
}

fn read_file(path: &std::path::Path, max: usize) -> Result<Vec<u8>, FetchError> {
    use std::io::Read;
    let file_err = |e: std::io::Error| FetchError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let f = std::fs::File::open(path).map_err(file_err)?;
    let mut out = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(file_err)?;
    if out.len() > max {
        return Err(FetchError::TooLarge {
            what: path.display().to_string(),
            max,
        });
    }
    Ok(out)
}

/// An error and its causes on one line (reqwest hides the TLS reason in them).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

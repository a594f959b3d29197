//! SPIFFE federation: the roots of foreign trust domains, read from each
//! one's bundle endpoint or file (`FEDERATION_CONFIG`) and published beside
//! this mesh's roots ([`super::TrustBundle::set_federated`]).
//!
//! Each domain has its own task. It reads the bundle at start, then again
//! after the bundle's refresh hint (5 minutes when it gives none), held
//! within `FEDERATION_REFRESH_MIN` and `FEDERATION_REFRESH_MAX`; after a
//! failure, sooner, with back-off from 1 s up to `FEDERATION_REFRESH_MIN`.
//! What is read is refused, and the last good bundle kept, when it is:
//! larger than `FEDERATION_MAX_BUNDLE_BYTES`; not a SPIFFE bundle (or, from
//! a file, PEM); a bundle whose roots name another trust domain in a
//! `spiffe://` URI SAN; or one with no root valid now. A domain whose source
//! is down keeps its last good roots, and says so in the log and in
//! `node_agent_federation_bundle_fresh`. Each change is logged with the
//! roots added and removed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use super::spiffe_bundle::{self, BundleError, TrustDomain};
use super::{Federated, RootCert};
use crate::backoff::Backoff;
use crate::clock::{rfc3339, Clock};
use crate::config::{BundleSource, FederatedDomain, FederationConfig, DEFAULT_FEDERATION_REFRESH};
use crate::crypto::pem_to_der;
use crate::metrics::{self, FederationRefresh};

pub mod source;
mod spiffe_tls;

use source::{EndpointRoots, FetchError, Source};

/// Where the federated roots go: the trust bundle, in the agent.
pub type Publish = Arc<dyn Fn(Arc<Federated>) + Send + Sync>;

/// The domains' tasks; dropping it stops them.
pub struct Federation {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Federation {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A domain's source could not be set up (unreadable CA file or bootstrap
/// bundle): the agent does not start.
#[derive(Debug, thiserror::Error)]
#[error("federated trust domain {trust_domain} (FEDERATION_CONFIG): {source}")]
pub struct SetupError {
    pub trust_domain: String,
    #[source]
    pub source: FetchError,
}

impl Federation {
    /// Starts one task per configured domain.
    pub fn start(
        cfg: &FederationConfig,
        clock: Clock,
        publish: Publish,
    ) -> Result<Self, SetupError> {
        let shared = Arc::new(Mutex::new(Federated::new()));
        let mut domains = Vec::new();
        for d in &cfg.domains {
            let endpoint_roots = EndpointRoots::default();
            let source = Source::new(&d.source, cfg.max_bundle_bytes, &endpoint_roots).map_err(
                |source| SetupError {
                    trust_domain: d.trust_domain.to_string(),
                    source,
                },
            )?;
            metrics::federation_configured(d.trust_domain.as_str());
            let follows_bundle = match &d.source {
                BundleSource::HttpsSpiffe {
                    endpoint_spiffe_id, ..
                } => {
                    endpoint_spiffe_id
                        .strip_prefix("spiffe://")
                        .and_then(|r| r.split('/').next())
                        == Some(d.trust_domain.as_str())
                }
                _ => false,
            };
            domains.push(Domain {
                cfg: d.clone(),
                source,
                endpoint_roots,
                follows_bundle,
                refresh_min: cfg.refresh_min,
                refresh_max: cfg.refresh_max,
                clock,
                shared: shared.clone(),
                publish: publish.clone(),
            });
        }
        let tasks = domains.into_iter().map(|d| tokio::spawn(d.run())).collect();
        Ok(Self { tasks })
    }
}

/// The roots (DER) of a bundle's bytes, a SPIFFE bundle or PEM, and the
/// refresh hint a SPIFFE bundle may give.
fn read_bundle(bytes: &[u8]) -> Result<(Vec<Vec<u8>>, Option<Duration>), String> {
    let text = std::str::from_utf8(bytes).unwrap_or("");
    if text.trim_start().starts_with("-----BEGIN") {
        let ders = pem_to_der(text).map_err(|e| e.to_string())?;
        if ders.is_empty() {
            return Err(BundleError::NoRoots.to_string());
        }
        return Ok((ders, None));
    }
    spiffe_bundle::parse(bytes)
        .map(|b| (b.roots, b.refresh_hint))
        .map_err(|e| e.to_string())
}

/// The roots (DER) of a bundle's bytes: a SPIFFE bundle, or PEM.
pub(crate) fn roots_of(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    read_bundle(bytes).map(|(roots, _)| roots)
}

/// What a read that was accepted gives.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub roots: Vec<RootCert>,
    pub refresh_hint: Option<Duration>,
}

/// Checks a bundle read for `td` (see the module documentation).
pub(crate) fn accept(td: &TrustDomain, bytes: &[u8], now: SystemTime) -> Result<Accepted, String> {
    let (ders, refresh_hint) = read_bundle(bytes)?;
    let mut roots = Vec::new();
    for der in &ders {
        for uri in spiffe_tls::uri_sans(der)? {
            if let Some(rest) = uri.strip_prefix("spiffe://") {
                let named = rest.split('/').next().unwrap_or(rest);
                if named != td.as_str() {
                    return Err(format!(
                        "a root names the trust domain {:?} (URI SAN {}), not {td}",
                        crate::endpoint::warn::shorten(named, 64),
                        crate::endpoint::warn::shorten(&uri, 80)
                    ));
                }
            }
        }
        let pem = crate::crypto::der_to_pem(der);
        let mut parsed = RootCert::parse_all(&pem).map_err(|e| e.to_string())?;
        roots.append(&mut parsed);
    }
    let total = roots.len();
    roots.retain(|r| r.not_after > now);
    if roots.is_empty() {
        return Err(format!(
            "none of its {total} root(s) is valid now; a trust domain with no roots trusts nothing"
        ));
    }
    Ok(Accepted {
        roots,
        refresh_hint,
    })
}

struct Domain {
    cfg: FederatedDomain,
    source: Source,
    endpoint_roots: EndpointRoots,
    /// An `https_spiffe` endpoint of this very domain: its certificate is
    /// checked against each bundle accepted from it.
    follows_bundle: bool,
    refresh_min: Duration,
    refresh_max: Duration,
    clock: Clock,
    shared: Arc<Mutex<Federated>>,
    publish: Publish,
}

impl Domain {
    async fn run(self) {
        let td = self.cfg.trust_domain.clone();
        let from = self.cfg.source.describe();
        let mut backoff = Backoff::new(Duration::from_secs(1), self.refresh_min);
        let mut served: Vec<RootCert> = Vec::new();
        loop {
            let outcome = match self.source.read().await {
                Err(e) => Err((FederationRefresh::Failed, e.to_string())),
                Ok(bytes) => accept(&td, &bytes, self.clock.now())
                    .map_err(|e| (FederationRefresh::Refused, e)),
            };
            let wait = match outcome {
                Ok(a) => {
                    self.install(&td, &from, &mut served, a.roots);
                    metrics::federation_refresh(td.as_str(), FederationRefresh::Ok, served.len());
                    backoff.reset();
                    a.refresh_hint
                        .unwrap_or(DEFAULT_FEDERATION_REFRESH)
                        .clamp(self.refresh_min, self.refresh_max)
                }
                Err((kind, why)) => {
                    let what = if kind == FederationRefresh::Failed {
                        "cannot read"
                    } else {
                        "refused"
                    };
                    let keeping = if served.is_empty() {
                        "no bundle of it has been read yet, so its workloads are not trusted"
                            .to_string()
                    } else {
                        format!("keeping its last good bundle ({} roots)", served.len())
                    };
                    let wait = backoff.next_delay();
                    tracing::warn!(
                        trust_domain = %td,
                        source = %from,
                        "federation: {what} the bundle of {td}: {why}; {keeping}; retrying in {:.1}s \
                         (check the bundle endpoint and FEDERATION_CONFIG)",
                        wait.as_secs_f64()
                    );
                    metrics::federation_refresh(td.as_str(), kind, served.len());
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Serves `roots` for the domain, logging what was added and removed.
    fn install(
        &self,
        td: &TrustDomain,
        from: &str,
        served: &mut Vec<RootCert>,
        roots: Vec<RootCert>,
    ) {
        let added: Vec<&RootCert> = roots
            .iter()
            .filter(|r| !served.iter().any(|s| s.id == r.id))
            .collect();
        let removed: Vec<&RootCert> = served
            .iter()
            .filter(|s| !roots.iter().any(|r| r.id == s.id))
            .collect();
        if added.is_empty() && removed.is_empty() {
            return;
        }
        for (what, list) in [("added", &added), ("removed", &removed)] {
            for r in list.iter() {
                tracing::info!(
                    trust_domain = %td,
                    source = %from,
                    subject = %r.subject,
                    serial = %r.serial,
                    expires = %rfc3339(r.not_after),
                    "federation: {what} a root of {td}"
                );
            }
        }
        if self.follows_bundle {
            *self.endpoint_roots.write().unwrap() = roots
                .iter()
                .filter_map(|r| pem_to_der(&r.pem).ok()?.into_iter().next())
                .map(rustls::pki_types::CertificateDer::from)
                .collect();
        }
        *served = roots;
        let pems: Vec<String> = served.iter().map(|r| r.pem.clone()).collect();
        // Published under the lock, so that two domains' changes reach the
        // trust bundle in the order they were made.
        let mut map = self.shared.lock().unwrap();
        map.insert(td.clone(), pems);
        (self.publish)(Arc::new(map.clone()));
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

//! Prometheus metrics, named `node_agent_*` (and the process's own under
//! the usual `process_*` names), built on `prometheus-client`.
//!
//! Instrumenting a site is one call of a free function of this module, which
//! records into the process-wide [`Metrics`] ([`global`]):
//!
//! ```
//! use node_agent::metrics::{self, CaKind, Refusal, Retry, TrustRefresh};
//! # async fn sign() -> Result<(), node_agent::ca::CaError> { Ok(()) }
//! # async fn example() -> Result<(), node_agent::ca::CaError> {
//! metrics::rotation();                 // a renewed certificate was installed
//! metrics::retry(Retry::Renewal);      // a failed renewal is tried again
//! metrics::pushed("default");          // an SDS response carried `default`
//! metrics::refused(Refusal::Limits);   // a request was refused at a bound
//! metrics::trust_refresh(TrustRefresh::Ok); // the CA's roots were read
//! let _open = metrics::stream_opened(); // counted open until dropped
//! // A request that reaches the CA, counted and timed by its outcome:
//! metrics::ca_request(CaKind::Sign, sign()).await?;
//! # Ok(()) }
//! ```
//!
//! One file per concern:
//! - `ca.rs`: CA requests by kind and outcome, with their latency; counted
//!   by each CA provider around the call that reaches the CA;
//! - `sds.rs`: pushes, streams, NACKs and refusals of the SDS server;
//! - `renewal.rs`: rotations and retries of the secret manager;
//! - `trust.rs`: refreshes of the trust bundle from the CA's roots;
//! - `federation.rs`: reads of federated trust domains' bundles;
//! - `identities.rs`: what the agent holds (identities, their expiry and
//!   renewal time, the CA queue), read at scrape time from an
//!   [`AgentReport`] (`report.rs`);
//! - `process.rs`: the process's memory, CPU and file descriptors;
//! - `format.rs`: the exposition formats.
//!
//! Labels are bounded: each is an enum here, except `identity`, which only
//! the cached identities carry, and the cache is bounded (`MAX_IDENTITIES`),
//! and `trust_domain`, which only the configured federated domains carry.

use std::future::Future;
use std::sync::{Arc, LazyLock, Weak};

use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

mod ca;
mod federation;
mod format;
mod identities;
mod process;
mod renewal;
mod report;
mod sds;
mod trust;

pub use ca::{CaKind, CaOutcome, ErrorOutcome};
pub use federation::FederationRefresh;
pub use format::Format;
pub use renewal::Retry;
pub use report::{AgentReport, IdentityReport};
pub use sds::{Refusal, StreamOpen};
pub use trust::TrustRefresh;

use ca::CaMetrics;
use federation::FederationMetrics;
use identities::{Part, ReportSlot, StateCollector};
use renewal::RenewalMetrics;
use sds::SdsMetrics;
use trust::TrustMetrics;

/// Every metric of the agent. Use [`global`] and the free functions; a
/// separate instance is for tests.
pub struct Metrics {
    registry: Registry,
    /// The series labelled with an identity, apart so that they can be left out.
    per_identity: Registry,
    ca: CaMetrics,
    sds: SdsMetrics,
    renewal: RenewalMetrics,
    trust: TrustMetrics,
    federation: FederationMetrics,
    report: Arc<ReportSlot>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("node_agent");
        registry.register(
            "build",
            "node-agent's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let ca = CaMetrics::register(registry);
        let renewal = RenewalMetrics::register(registry);
        let sds = SdsMetrics::register(registry);
        let trust = TrustMetrics::register(registry);
        let federation = FederationMetrics::register(registry);
        let report = Arc::new(ReportSlot::default());
        registry.register_collector(Box::new(StateCollector(report.clone(), Part::NodeWide)));
        let mut per_identity = Registry::with_prefix("node_agent");
        per_identity
            .register_collector(Box::new(StateCollector(report.clone(), Part::PerIdentity)));
        Self {
            registry: root,
            per_identity,
            ca,
            sds,
            renewal,
            trust,
            federation,
            report,
        }
    }

    /// Where the agent's state is read from at scrape time.
    pub fn set_report(&self, report: Weak<dyn AgentReport>) {
        self.report.set(report);
    }

    /// The agent state registered with [`Metrics::set_report`], if it is still running.
    pub fn report(&self) -> Option<Arc<dyn AgentReport>> {
        self.report.get()
    }

    /// The metrics in `format`.
    pub fn encode(&self, format: Format) -> String {
        format.encode(&[&self.registry, &self.per_identity])
    }

    /// The metrics in `format` without the series labelled with an
    /// identity: what the whole node does, nothing of which workloads it serves.
    pub fn encode_node_wide(&self, format: Format) -> String {
        format.encode(&[&self.registry])
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// Sends one request to the CA: runs `request`, then counts and times it in
/// `node_agent_ca_requests_total` and `node_agent_ca_request_duration_seconds`
/// by its outcome. Only CA providers call this, around what really reaches
/// the CA (see `ca.rs`: nothing else counts CA requests).
pub async fn ca_request<T, E: ErrorOutcome>(
    kind: CaKind,
    request: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    global().ca.time(kind, request).await
}

/// Something is tried again after a failure.
pub fn retry(what: Retry) {
    global().renewal.retry(what)
}

/// A renewed certificate was installed.
pub fn rotation() {
    global().renewal.rotation()
}

/// An SDS response carried `resource`.
pub fn pushed(resource: &str) {
    global().sds.pushed(resource)
}

/// An SDS stream opened; it counts as open until the returned guard drops.
pub fn stream_opened() -> StreamOpen {
    global().sds.stream_opened()
}

/// Envoy rejected an SDS response.
pub fn nack() {
    global().sds.nack()
}

/// An SDS request was refused.
pub fn refused(reason: Refusal) {
    global().sds.refused(reason)
}

/// The trust bundle was refreshed from the CA's roots, or failed to be.
pub fn trust_refresh(outcome: TrustRefresh) {
    global().trust.refreshed(outcome)
}

/// A federated trust domain is configured: its series start at zero.
pub fn federation_configured(trust_domain: &str) {
    global().federation.configured(trust_domain)
}

/// A federated trust domain's bundle was read (or not); `roots_served` is
/// what is served for it now.
pub fn federation_refresh(trust_domain: &str, outcome: FederationRefresh, roots_served: usize) {
    global()
        .federation
        .refreshed(trust_domain, outcome, roots_served)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family is registered once, typed, and every bounded counter
    /// series exists at zero before the first event (the latency
    /// histogram's series appear with their first request).
    #[test]
    fn names_types_and_zero_series() {
        let m = Metrics::new();
        m.renewal.rotation();
        m.renewal.retry(Retry::Renewal);
        let text = m.encode(Format::Prometheus);
        for line in [
            "# TYPE node_agent_ca_requests_total counter\n",
            "# TYPE node_agent_rotations_total counter\n",
            "# TYPE node_agent_retries_total counter\n",
            "# TYPE node_agent_sds_pushes_total counter\n",
            "# TYPE node_agent_sds_streams_open gauge\n",
            "# TYPE node_agent_sds_nacks_total counter\n",
            "# TYPE node_agent_sds_requests_refused_total counter\n",
            "# TYPE node_agent_trust_refreshes_total counter\n",
            "# TYPE process_resident_memory_bytes gauge\n",
            "node_agent_ca_requests_total{kind=\"login\",outcome=\"bad_answer\"} 0\n",
            "node_agent_rotations_total 1\n",
            "node_agent_retries_total{operation=\"renewal\"} 1\n",
            "node_agent_retries_total{operation=\"ca_request\"} 0\n",
            "node_agent_retries_total{operation=\"first_fetch\"} 0\n",
            "node_agent_build_info{version=\"",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(m.encode(Format::OpenMetrics).ends_with("# EOF\n"));
    }
}

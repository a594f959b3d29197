//! Prometheus metrics, all named `node_agent_*`, built on `prometheus-client`.
//!
//! Instrumenting a site is one call of a free function of this module, which
//! records into the process-wide [`Metrics`] ([`global`]):
//!
//! ```
//! use node_agent::metrics::{self, Refusal, Retry};
//! metrics::rotation();                 // a renewed certificate was installed
//! metrics::pushed("default");          // an SDS response carried `default`
//! metrics::retry(Retry::FirstFetch);   // a waiting stream asks the CA again
//! metrics::refused(Refusal::Limits);   // a request was refused at a bound
//! let _open = metrics::stream_opened(); // counted open until dropped
//! ```
//!
//! CA requests are counted by [`MeteredCa`], which wraps any [`CaClient`](crate::ca::CaClient).
//! What the agent holds (identities, expiry, queue depth) is read at scrape
//! time from an [`AgentReport`], so that it cannot drift from the cache.
//!
//! Labels are bounded: each is an enum here, except `identity`, which only
//! the cached identities carry, and the cache is bounded.

use std::sync::{Arc, LazyLock, RwLock, Weak};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::ca::CaError;
use crate::secrets::SecretError;

mod ca;
mod report;

pub use ca::MeteredCa;
pub use report::{AgentReport, IdentityReport};

/// Which CA request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// Proving a workload's credential (Vault: `auth/.../login`).
    Login,
    /// Signing a CSR.
    Sign,
    /// Listing the CA's roots.
    Roots,
}

impl CaKind {
    pub const ALL: [CaKind; 3] = [CaKind::Login, CaKind::Sign, CaKind::Roots];
    pub fn as_str(self) -> &'static str {
        match self {
            CaKind::Login => "login",
            CaKind::Sign => "sign",
            CaKind::Roots => "roots",
        }
    }
}

/// How a CA request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaOutcome {
    Ok,
    /// The CA refused the credential or the request.
    Rejected,
    /// The CA could not be reached, timed out or failed.
    Unavailable,
    /// The CA answered something that cannot be used.
    BadAnswer,
}

impl CaOutcome {
    pub const ALL: [CaOutcome; 4] = [
        CaOutcome::Ok,
        CaOutcome::Rejected,
        CaOutcome::Unavailable,
        CaOutcome::BadAnswer,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CaOutcome::Ok => "ok",
            CaOutcome::Rejected => "rejected",
            CaOutcome::Unavailable => "unavailable",
            CaOutcome::BadAnswer => "bad_answer",
        }
    }

    /// The outcome of a CA call, or `None` when the CA was not asked (a
    /// rejection answered from memory).
    pub fn of<T>(result: &Result<T, CaError>) -> Option<Self> {
        match result {
            Ok(_) => Some(CaOutcome::Ok),
            Err(CaError::Rejected(_)) => Some(CaOutcome::Rejected),
            Err(CaError::RecentlyRejected(_)) => None,
            Err(CaError::Unavailable(_)) => Some(CaOutcome::Unavailable),
            Err(CaError::BadAnswer(_)) => Some(CaOutcome::BadAnswer),
        }
    }
}

/// What is tried again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A stream waiting for its first certificate asks again (the CA was unavailable).
    FirstFetch,
    /// A failed renewal is tried again.
    Renewal,
    /// One CA request is sent again (e.g. to another Vault node).
    CaRequest,
}

impl Retry {
    pub const ALL: [Retry; 3] = [Retry::FirstFetch, Retry::Renewal, Retry::CaRequest];
    pub fn as_str(self) -> &'static str {
        match self {
            Retry::FirstFetch => "first_fetch",
            Retry::Renewal => "renewal",
            Retry::CaRequest => "ca_request",
        }
    }
}

/// Why an SDS request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credential, or one that names no identity (checked locally).
    Credential,
    /// The CA refused the workload's credential or request.
    Rejected,
    /// A bound of the agent was reached.
    Limits,
    /// A malformed request (unknown resource, type URL).
    InvalidRequest,
    /// The CA's answer was unusable, or the agent itself failed.
    Failure,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::Credential,
        Refusal::Rejected,
        Refusal::Limits,
        Refusal::InvalidRequest,
        Refusal::Failure,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Credential => "credential",
            Refusal::Rejected => "rejected",
            Refusal::Limits => "limits",
            Refusal::InvalidRequest => "invalid_request",
            Refusal::Failure => "failure",
        }
    }

    /// The reason a [`SecretError`] refuses a request. Transient CA failures
    /// do not refuse (the stream waits), but are mapped for completeness.
    pub fn of(e: &SecretError) -> Self {
        match e {
            SecretError::Credential(_) => Refusal::Credential,
            SecretError::Login(err) | SecretError::Sign { error: err, .. } => {
                if err.is_rejection() {
                    Refusal::Rejected
                } else {
                    Refusal::Failure
                }
            }
            SecretError::LimitReached { .. } => Refusal::Limits,
            SecretError::Internal(_) => Refusal::Failure,
        }
    }
}

/// SDS resource label: the two names served, anything else as `other`
/// (never a name a client chose, so the label stays bounded).
fn resource_label(name: &str) -> &'static str {
    match name {
        crate::sds::resources::DEFAULT => crate::sds::resources::DEFAULT,
        crate::sds::resources::ROOTCA => crate::sds::resources::ROOTCA,
        _ => "other",
    }
}

/// Buckets of the CA latency histogram, in seconds: 5 ms to 20 s (Vault's
/// request time-out is 15 s by default).
const CA_LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
];

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

#[derive(Clone)]
struct LatencyHistogram;

impl MetricConstructor<Histogram> for LatencyHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(CA_LATENCY_BUCKETS)
    }
}

/// Every metric of the agent. Use [`global`] and the free functions; a
/// separate instance is for tests.
pub struct Metrics {
    registry: Registry,
    ca_requests: Family<Labels2, Counter>,
    ca_duration: Family<Labels2, Histogram, LatencyHistogram>,
    retries: Family<Labels1, Counter>,
    rotations: Counter,
    pushes: Family<Labels1, Counter>,
    streams_open: Gauge,
    nacks: Counter,
    refused: Family<Labels1, Counter>,
    report: Arc<ReportSlot>,
}

/// The agent state read at scrape time; weak, so that metrics never keep a
/// stopped agent's cache alive.
#[derive(Default)]
struct ReportSlot(RwLock<Option<Weak<dyn AgentReport>>>);

impl std::fmt::Debug for ReportSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReportSlot")
    }
}

impl ReportSlot {
    fn get(&self) -> Option<Arc<dyn AgentReport>> {
        self.0.read().ok()?.as_ref()?.upgrade()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("node_agent");
        registry.register(
            "build",
            "node-agent's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let ca_requests = Family::<Labels2, Counter>::default();
        registry.register(
            "ca_requests",
            "Requests sent to the CA, by kind (login, sign, roots) and outcome (ok, rejected, unavailable, bad_answer)",
            ca_requests.clone(),
        );
        let ca_duration = Family::new_with_constructor(LatencyHistogram);
        registry.register(
            "ca_request_duration_seconds",
            "Time a CA request took, by kind and outcome",
            ca_duration.clone(),
        );
        let retries = Family::<Labels1, Counter>::default();
        registry.register(
            "retries",
            "Attempts made again after a failure, by operation (first_fetch, renewal, ca_request)",
            retries.clone(),
        );
        let rotations = Counter::default();
        registry.register(
            "rotations",
            "Certificates renewed and installed before expiry (each is pushed to every stream of its identity)",
            rotations.clone(),
        );
        let pushes = Family::<Labels1, Counter>::default();
        registry.register(
            "sds_pushes",
            "SDS responses sent, by resource (default, ROOTCA)",
            pushes.clone(),
        );
        let streams_open = Gauge::default();
        registry.register(
            "sds_streams_open",
            "SDS streams currently open",
            streams_open.clone(),
        );
        let nacks = Counter::default();
        registry.register(
            "sds_nacks",
            "SDS responses Envoy rejected (NACK)",
            nacks.clone(),
        );
        let refused = Family::<Labels1, Counter>::default();
        registry.register(
            "sds_requests_refused",
            "SDS requests refused, by reason (credential, rejected, limits, invalid_request, failure)",
            refused.clone(),
        );
        let report = Arc::new(ReportSlot::default());
        registry.register_collector(Box::new(StateCollector(report.clone())));

        // Every bounded series exists from the start, at zero, so that rates
        // and alerts work before the first event.
        for kind in CaKind::ALL {
            for outcome in CaOutcome::ALL {
                let _ = ca_requests
                    .get_or_create(&[("kind", kind.as_str()), ("outcome", outcome.as_str())]);
            }
        }
        for r in Retry::ALL {
            let _ = retries.get_or_create(&[("operation", r.as_str())]);
        }
        for r in [
            crate::sds::resources::DEFAULT,
            crate::sds::resources::ROOTCA,
        ] {
            let _ = pushes.get_or_create(&[("resource", r)]);
        }
        for r in Refusal::ALL {
            let _ = refused.get_or_create(&[("reason", r.as_str())]);
        }
        Self {
            registry,
            ca_requests,
            ca_duration,
            retries,
            rotations,
            pushes,
            streams_open,
            nacks,
            refused,
            report,
        }
    }

    /// Where the agent's state is read from at scrape time.
    pub fn set_report(&self, report: Weak<dyn AgentReport>) {
        if let Ok(mut slot) = self.report.0.write() {
            *slot = Some(report);
        }
    }

    /// The agent state registered with [`Metrics::set_report`], if it is still running.
    pub fn report(&self) -> Option<Arc<dyn AgentReport>> {
        self.report.get()
    }

    pub fn ca_request(&self, kind: CaKind, outcome: CaOutcome, took: Duration) {
        let labels = [("kind", kind.as_str()), ("outcome", outcome.as_str())];
        self.ca_requests.get_or_create(&labels).inc();
        self.ca_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn retry(&self, what: Retry) {
        self.retries
            .get_or_create(&[("operation", what.as_str())])
            .inc();
    }

    pub fn rotation(&self) {
        self.rotations.inc();
    }

    pub fn pushed(&self, resource: &str) {
        self.pushes
            .get_or_create(&[("resource", resource_label(resource))])
            .inc();
    }

    pub fn stream_opened(&'static self) -> StreamOpen {
        self.streams_open.inc();
        StreamOpen(&self.streams_open)
    }

    pub fn nack(&self) {
        self.nacks.inc();
    }

    pub fn refused(&self, reason: Refusal) {
        self.refused
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// The metrics in the Prometheus text format 0.0.4, or OpenMetrics.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        let r = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)
            }
        };
        // Writing into a String cannot fail; a collector error would be a bug.
        if let Err(e) = r {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }
}

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`, what every Prometheus scrapes.
    Prometheus,
    /// OpenMetrics 1.0 text, chosen when the scraper asks for it.
    OpenMetrics,
}

impl Format {
    /// Picks the format a scraper's `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// An open SDS stream, counted in `node_agent_sds_streams_open` until dropped.
#[must_use = "the stream counts as open only while this is held"]
pub struct StreamOpen(&'static Gauge);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads the agent's state at each scrape.
#[derive(Debug)]
struct StateCollector(Arc<ReportSlot>);

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(report) = self.0.get() else {
            return Ok(());
        };
        let cached = ConstGauge::new(report.identities_cached() as i64);
        cached.encode(encoder.encode_descriptor(
            "identities_cached",
            "Workload identities in the cache (each with its key and certificate)",
            None,
            cached.metric_type(),
        )?)?;
        if let Some(depth) = report.ca_queue_depth() {
            let depth = ConstGauge::new(depth as i64);
            depth.encode(encoder.encode_descriptor(
                "ca_queue_depth",
                "CA requests waiting for a slot (CA_MAX_CONCURRENCY)",
                None,
                depth.metric_type(),
            )?)?;
        }
        let Some(identities) = report.identities() else {
            return Ok(());
        };
        let expiring: Vec<(&str, SystemTime)> = identities
            .iter()
            .filter_map(|i| Some((i.identity.as_str(), i.not_after?)))
            .collect();
        let now = SystemTime::now();
        let gauge_type = ConstGauge::new(0i64).metric_type();
        {
            let mut family = encoder.encode_descriptor(
                "certificate_expiry_timestamp_seconds",
                "When the identity's certificate expires, in seconds since the Unix epoch",
                None,
                gauge_type,
            )?;
            for (identity, not_after) in &expiring {
                let labels = [("identity", *identity)];
                ConstGauge::new(unix_seconds(*not_after)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "certificate_expires_in_seconds",
            "Seconds left before the identity's certificate expires (negative once expired)",
            None,
            gauge_type,
        )?;
        for (identity, not_after) in &expiring {
            let labels = [("identity", *identity)];
            ConstGauge::new(unix_seconds(*not_after) - unix_seconds(now))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// A CA request ended with `outcome` after `took`.
pub fn ca_request(kind: CaKind, outcome: CaOutcome, took: Duration) {
    global().ca_request(kind, outcome, took)
}

/// Something is tried again after a failure.
pub fn retry(what: Retry) {
    global().retry(what)
}

/// A renewed certificate was installed.
pub fn rotation() {
    global().rotation()
}

/// An SDS response carried `resource`.
pub fn pushed(resource: &str) {
    global().pushed(resource)
}

/// An SDS stream opened; it counts as open until the returned guard drops.
pub fn stream_opened() -> StreamOpen {
    global().stream_opened()
}

/// Envoy rejected an SDS response.
pub fn nack() {
    global().nack()
}

/// An SDS request was refused.
pub fn refused(reason: Refusal) {
    global().refused(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_types_and_zero_series() {
        let m = Metrics::new();
        m.ca_request(CaKind::Sign, CaOutcome::Ok, Duration::from_millis(30));
        m.pushed("default");
        m.pushed("attacker-chosen-name");
        m.refused(Refusal::of(&SecretError::LimitReached {
            setting: "X",
            message: "full".into(),
        }));
        let text = m.encode(Format::Prometheus);
        for line in [
            "# TYPE node_agent_ca_requests_total counter",
            "node_agent_ca_requests_total{kind=\"sign\",outcome=\"ok\"} 1",
            "node_agent_ca_requests_total{kind=\"login\",outcome=\"bad_answer\"} 0",
            "node_agent_ca_request_duration_seconds_bucket{kind=\"sign\",outcome=\"ok\",le=\"0.05\"} 1",
            "node_agent_sds_pushes_total{resource=\"default\"} 1",
            "node_agent_sds_pushes_total{resource=\"other\"} 1",
            "node_agent_sds_requests_refused_total{reason=\"limits\"} 1",
            "node_agent_retries_total{operation=\"renewal\"} 0",
            "node_agent_build_info{version=\"",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("attacker"),
            "a client's name never becomes a label"
        );
        assert!(m.encode(Format::OpenMetrics).ends_with("# EOF\n"));
    }

    #[test]
    fn stream_gauge_follows_the_guards() {
        static M: LazyLock<Metrics> = LazyLock::new(Metrics::new);
        let a = M.stream_opened();
        let b = M.stream_opened();
        assert_eq!(M.streams_open.get(), 2);
        drop(a);
        assert_eq!(M.streams_open.get(), 1);
        drop(b);
        assert_eq!(M.streams_open.get(), 0);
    }

    struct Fixed(Vec<IdentityReport>);

    impl AgentReport for Fixed {
        fn identities_cached(&self) -> usize {
            self.0.len()
        }
        fn identities(&self) -> Option<Vec<IdentityReport>> {
            Some(self.0.clone())
        }
        fn ca_queue_depth(&self) -> Option<usize> {
            Some(3)
        }
    }

    #[test]
    fn state_is_read_at_scrape_time_and_only_while_the_agent_lives() {
        let m = Metrics::new();
        let in_an_hour = SystemTime::now() + Duration::from_secs(3600);
        let report: Arc<dyn AgentReport> = Arc::new(Fixed(vec![IdentityReport {
            identity: "spiffe://td/ns/a/sa/b".into(),
            not_after: Some(in_an_hour),
            ..IdentityReport::default()
        }]));
        m.set_report(Arc::downgrade(&report));
        let text = m.encode(Format::Prometheus);
        assert!(text.contains("node_agent_identities_cached 1"), "{text}");
        assert!(text.contains("node_agent_ca_queue_depth 3"), "{text}");
        let ts = format!(
            "node_agent_certificate_expiry_timestamp_seconds{{identity=\"spiffe://td/ns/a/sa/b\"}} {}",
            unix_seconds(in_an_hour)
        );
        assert!(text.contains(&ts), "{text}");
        let left = text
            .lines()
            .find_map(|l| l.strip_prefix("node_agent_certificate_expires_in_seconds{identity=\"spiffe://td/ns/a/sa/b\"} "))
            .expect("seconds left");
        let left: i64 = left.parse().unwrap();
        assert!((3590..=3600).contains(&left), "{left}");
        drop(report);
        let text = m.encode(Format::Prometheus);
        assert!(!text.contains("identities_cached"), "{text}");
    }
}

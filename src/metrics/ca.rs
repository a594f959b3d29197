//! CA requests: `node_agent_ca_requests_total` and
//! `node_agent_ca_request_duration_seconds`, by kind and outcome.
//!
//! A request is counted by the CA provider itself, around the call that
//! really reaches the CA ([`crate::metrics::ca_request`]), because only the
//! provider knows whether the CA was asked: a login answered from the
//! provider's cache, or coalesced with one in flight for the same JWT, a
//! rejection answered from memory and an expired JWT refused locally are not
//! requests, and a read of the mount's roots made while signing is a `roots`
//! request of its own. Wrapping the CA client trait instead would count
//! those wrongly; nothing else counts CA requests, so none is counted twice.
//!
//! The outcome label comes from the request's error ([`ErrorOutcome`],
//! implemented by the CA clients' error type), so this module knows nothing
//! of the CA clients.

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Which CA request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// Proving a workload's credential (Vault: `auth/.../login`).
    Login,
    /// Signing a CSR.
    Sign,
    /// Reading the CA's roots (Vault: the PKI mount's issuers).
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

    /// The outcome of a CA call, or `None` when the CA was not asked.
    pub fn of<T, E: ErrorOutcome>(result: &Result<T, E>) -> Option<Self> {
        match result {
            Ok(_) => Some(CaOutcome::Ok),
            Err(e) => e.outcome(),
        }
    }
}

/// How a failed CA request ended, as its error tells.
pub trait ErrorOutcome {
    /// The outcome, or `None` when the CA was not asked (a rejection
    /// answered from memory, a credential the agent refused by itself): such
    /// a call is not counted.
    fn outcome(&self) -> Option<CaOutcome>;
}

/// Buckets of the CA latency histogram, in seconds: 5 ms to 20 s (Vault's
/// request time-out is 15 s by default).
const CA_LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
];

type Labels = [(&'static str, &'static str); 2];

#[derive(Clone)]
struct LatencyHistogram;

impl MetricConstructor<Histogram> for LatencyHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(CA_LATENCY_BUCKETS)
    }
}

/// The CA request families.
pub(super) struct CaMetrics {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, LatencyHistogram>,
}

impl CaMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "ca_requests",
            "Requests that reached the CA, by kind (login, sign, roots) and outcome (ok, rejected, unavailable, bad_answer)",
            requests.clone(),
        );
        let duration = Family::new_with_constructor(LatencyHistogram);
        registry.register(
            "ca_request_duration_seconds",
            "Time a CA request took, by kind and outcome",
            duration.clone(),
        );
        // Every series exists from the start, at zero.
        for kind in CaKind::ALL {
            for outcome in CaOutcome::ALL {
                let _ = requests.get_or_create(&labels(kind, outcome));
            }
        }
        Self { requests, duration }
    }

    pub fn record(&self, kind: CaKind, outcome: CaOutcome, took: Duration) {
        let labels = labels(kind, outcome);
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Runs `request`, then counts and times it by its outcome (see
    /// [`CaOutcome::of`] for what is not counted).
    pub async fn time<T, E: ErrorOutcome>(
        &self,
        kind: CaKind,
        request: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = request.await;
        if let Some(outcome) = CaOutcome::of(&result) {
            self.record(kind, outcome, started.elapsed());
        }
        result
    }
}

fn labels(kind: CaKind, outcome: CaOutcome) -> Labels {
    [("kind", kind.as_str()), ("outcome", outcome.as_str())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, Metrics};

    /// A CA error as the CA clients classify theirs.
    struct Failed(Option<CaOutcome>);

    impl ErrorOutcome for Failed {
        fn outcome(&self) -> Option<CaOutcome> {
            self.0
        }
    }

    #[tokio::test]
    async fn counts_and_times_what_reached_the_ca_only() {
        let m = Metrics::new();
        let ca = &m.ca;
        let fail = |outcome| async move { Err::<(), _>(Failed(outcome)) };
        ca.time(CaKind::Login, async { Ok::<_, Failed>(()) })
            .await
            .ok();
        let _ = ca
            .time(CaKind::Login, fail(Some(CaOutcome::Rejected)))
            .await;
        let _ = ca
            .time(CaKind::Sign, fail(Some(CaOutcome::Unavailable)))
            .await;
        let _ = ca
            .time(CaKind::Roots, fail(Some(CaOutcome::BadAnswer)))
            .await;
        // Not requests: the CA was not asked.
        let _ = ca.time(CaKind::Sign, fail(None)).await;
        let _ = ca.time(CaKind::Login, fail(None)).await;
        let text = m.encode(Format::Prometheus);
        for (labels, n) in [
            ("kind=\"login\",outcome=\"ok\"", 1),
            ("kind=\"login\",outcome=\"rejected\"", 1),
            ("kind=\"sign\",outcome=\"unavailable\"", 1),
            ("kind=\"roots\",outcome=\"bad_answer\"", 1),
            ("kind=\"sign\",outcome=\"rejected\"", 0),
            ("kind=\"sign\",outcome=\"ok\"", 0),
        ] {
            let line = format!("node_agent_ca_requests_total{{{labels}}} {n}\n");
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains(
            "node_agent_ca_request_duration_seconds_count{kind=\"login\",outcome=\"ok\"} 1\n"
        ));
        assert!(!text.contains(
            "node_agent_ca_request_duration_seconds_count{kind=\"sign\",outcome=\"rejected\"}"
        ));
    }
}

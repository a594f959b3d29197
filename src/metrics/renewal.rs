//! What the secret manager does over time: `node_agent_rotations_total`
//! and `node_agent_retries_total` by operation.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// What is tried again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A stream waiting for its first certificate asks again (the CA was
    /// unavailable). Counted by src/sds.
    FirstFetch,
    /// A renewal is attempted again after a failed one.
    Renewal,
    /// A sign the CA refused because it refused the token the sign carried
    /// is tried again, once, after a new login.
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

type Labels = [(&'static str, &'static str); 1];

/// The renewal families.
pub(super) struct RenewalMetrics {
    retries: Family<Labels, Counter>,
    rotations: Counter,
}

impl RenewalMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let retries = Family::<Labels, Counter>::default();
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
        for r in Retry::ALL {
            let _ = retries.get_or_create(&[("operation", r.as_str())]);
        }
        Self { retries, rotations }
    }

    pub fn retry(&self, what: Retry) {
        self.retries
            .get_or_create(&[("operation", what.as_str())])
            .inc();
    }

    pub fn rotation(&self) {
        self.rotations.inc();
    }
}

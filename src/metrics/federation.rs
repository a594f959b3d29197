//! Federated trust domains' bundles: `node_agent_federation_refreshes_total`
//! by trust domain and outcome, and per trust domain the roots served and
//! whether the last read was good (`node_agent_federation_bundle_fresh`: 0
//! while a bundle endpoint is down or answers what is refused, and the last
//! good bundle is served).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// How one read of a federated trust domain's bundle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FederationRefresh {
    /// Read and accepted (changed or not).
    Ok,
    /// The source could not be read (down, HTTP error, too large).
    Failed,
    /// Read, but refused (not a bundle, another trust domain, no roots).
    Refused,
}

impl FederationRefresh {
    pub const ALL: [FederationRefresh; 3] = [Self::Ok, Self::Failed, Self::Refused];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }
}

type Td = [(&'static str, String); 1];
type TdOutcome = [(&'static str, String); 2];

pub(super) struct FederationMetrics {
    refreshes: Family<TdOutcome, Counter>,
    roots: Family<Td, Gauge>,
    fresh: Family<Td, Gauge>,
}

impl FederationMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let refreshes = Family::<TdOutcome, Counter>::default();
        registry.register(
            "federation_refreshes",
            "Reads of a federated trust domain's bundle, by trust domain and outcome (ok, failed, refused)",
            refreshes.clone(),
        );
        let roots = Family::<Td, Gauge>::default();
        registry.register(
            "federation_bundle_roots",
            "Roots served for a federated trust domain (its last good bundle)",
            roots.clone(),
        );
        let fresh = Family::<Td, Gauge>::default();
        registry.register(
            "federation_bundle_fresh",
            "1 when the last read of a federated trust domain's bundle was good; 0 while its last good bundle is served instead",
            fresh.clone(),
        );
        Self {
            refreshes,
            roots,
            fresh,
        }
    }

    /// Every series of a configured trust domain exists from the start.
    pub fn configured(&self, td: &str) {
        for o in FederationRefresh::ALL {
            let _ = self.refreshes.get_or_create(&[
                ("trust_domain", td.to_string()),
                ("outcome", o.as_str().to_string()),
            ]);
        }
        let _ = self
            .roots
            .get_or_create(&[("trust_domain", td.to_string())]);
        let _ = self
            .fresh
            .get_or_create(&[("trust_domain", td.to_string())]);
    }

    pub fn refreshed(&self, td: &str, outcome: FederationRefresh, roots_served: usize) {
        self.refreshes
            .get_or_create(&[
                ("trust_domain", td.to_string()),
                ("outcome", outcome.as_str().to_string()),
            ])
            .inc();
        self.roots
            .get_or_create(&[("trust_domain", td.to_string())])
            .set(roots_served as i64);
        self.fresh
            .get_or_create(&[("trust_domain", td.to_string())])
            .set(i64::from(outcome == FederationRefresh::Ok));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, Metrics};

    #[test]
    fn per_trust_domain_from_zero() {
        let m = Metrics::new();
        m.federation.configured("other.example");
        let text = m.encode(Format::Prometheus);
        for line in [
            "# TYPE node_agent_federation_refreshes_total counter\n",
            "node_agent_federation_refreshes_total{trust_domain=\"other.example\",outcome=\"failed\"} 0\n",
            "node_agent_federation_bundle_fresh{trust_domain=\"other.example\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        m.federation
            .refreshed("other.example", FederationRefresh::Ok, 2);
        m.federation
            .refreshed("other.example", FederationRefresh::Failed, 2);
        let text = m.encode(Format::Prometheus);
        for line in [
            "node_agent_federation_refreshes_total{trust_domain=\"other.example\",outcome=\"ok\"} 1\n",
            "node_agent_federation_refreshes_total{trust_domain=\"other.example\",outcome=\"failed\"} 1\n",
            "node_agent_federation_bundle_roots{trust_domain=\"other.example\"} 2\n",
            "node_agent_federation_bundle_fresh{trust_domain=\"other.example\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}

//! The trust bundle's reads of the CA's roots:
//! `node_agent_trust_refreshes_total` by outcome. Recorded by the trust
//! bundle's background task, once per refresh, whatever asked for it (the
//! interval, a back-off retry, an issued chain ending in an unknown root).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// How a refresh of the trust bundle from the CA ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustRefresh {
    /// The CA's roots were read and the bundle updated from them.
    Ok,
    /// The CA could not be read, listed no roots after it had listed some,
    /// or listed none that could be parsed: the last good bundle is kept.
    Failed,
}

impl TrustRefresh {
    pub const ALL: [TrustRefresh; 2] = [TrustRefresh::Ok, TrustRefresh::Failed];
    pub fn as_str(self) -> &'static str {
        match self {
            TrustRefresh::Ok => "ok",
            TrustRefresh::Failed => "failed",
        }
    }
}

type Labels = [(&'static str, &'static str); 1];

/// The trust bundle family.
pub(super) struct TrustMetrics {
    refreshes: Family<Labels, Counter>,
}

impl TrustMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let refreshes = Family::<Labels, Counter>::default();
        registry.register(
            "trust_refreshes",
            "Refreshes of the trust bundle (ROOTCA) from the CA's roots, by outcome (ok, failed)",
            refreshes.clone(),
        );
        // Every series exists from the start, at zero.
        for o in TrustRefresh::ALL {
            let _ = refreshes.get_or_create(&[("outcome", o.as_str())]);
        }
        Self { refreshes }
    }

    pub fn refreshed(&self, outcome: TrustRefresh) {
        self.refreshes
            .get_or_create(&[("outcome", outcome.as_str())])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, Metrics};

    #[test]
    fn refreshes_by_outcome_from_zero() {
        let m = Metrics::new();
        let text = m.encode(Format::Prometheus);
        assert!(text.contains("# TYPE node_agent_trust_refreshes_total counter\n"));
        assert!(text.contains("node_agent_trust_refreshes_total{outcome=\"failed\"} 0\n"));
        m.trust.refreshed(TrustRefresh::Failed);
        m.trust.refreshed(TrustRefresh::Failed);
        m.trust.refreshed(TrustRefresh::Ok);
        let text = m.encode(Format::Prometheus);
        for line in [
            "node_agent_trust_refreshes_total{outcome=\"failed\"} 2\n",
            "node_agent_trust_refreshes_total{outcome=\"ok\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}

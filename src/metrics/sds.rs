//! What the SDS server does: `node_agent_sds_pushes_total` by resource,
//! `node_agent_sds_streams_open`, `node_agent_sds_nacks_total` and
//! `node_agent_sds_requests_refused_total` by reason. Recorded by the SDS
//! and Workload API servers.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
}

/// The values of the `resource` label: the names of the SDS resources the
/// agent serves (the workload's certificate, this mesh's trust bundle, and
/// every trust domain's).
const RESOURCES: [&str; 3] = ["default", "ROOTCA", "ALL"];

/// The index in [`RESOURCES`] of a name served; `None` for anything else,
/// counted as `other` (never a name a client chose, so the label stays
/// bounded).
fn resource_index(name: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| *r == name)
}

type Labels = [(&'static str, &'static str); 1];

/// The SDS families.
pub(super) struct SdsMetrics {
    pushes: Family<Labels, Counter>,
    /// The series of `pushes` for [`RESOURCES`], in order, so that a push
    /// is counted without looking its labels up.
    push_series: [Counter; RESOURCES.len()],
    pub(super) streams_open: Gauge,
    nacks: Counter,
    refused: Family<Labels, Counter>,
}

impl SdsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let pushes = Family::<Labels, Counter>::default();
        registry.register(
            "sds_pushes",
            "SDS responses sent, by resource (default, ROOTCA, ALL)",
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
        let refused = Family::<Labels, Counter>::default();
        registry.register(
            "sds_requests_refused",
            "SDS requests refused, by reason (credential, rejected, limits, invalid_request, failure)",
            refused.clone(),
        );
        // Every series exists from the start, at zero.
        let push_series = RESOURCES.map(|r| pushes.get_or_create(&[("resource", r)]).clone());
        for r in Refusal::ALL {
            let _ = refused.get_or_create(&[("reason", r.as_str())]);
        }
        Self {
            pushes,
            push_series,
            streams_open,
            nacks,
            refused,
        }
    }

    pub fn pushed(&self, resource: &str) {
        match resource_index(resource) {
            Some(i) => {
                self.push_series[i].inc();
            }
            None => {
                self.pushes.get_or_create(&[("resource", "other")]).inc();
            }
        }
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
}

/// An open SDS stream, counted in `node_agent_sds_streams_open` until dropped.
#[must_use = "the stream counts as open only while this is held"]
pub struct StreamOpen(&'static Gauge);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, Metrics};
    use std::sync::LazyLock;

    #[test]
    fn stream_gauge_follows_the_guards() {
        static M: LazyLock<Metrics> = LazyLock::new(Metrics::new);
        let a = M.sds.stream_opened();
        let b = M.sds.stream_opened();
        assert_eq!(M.sds.streams_open.get(), 2);
        drop(a);
        assert_eq!(M.sds.streams_open.get(), 1);
        drop(b);
        assert_eq!(M.sds.streams_open.get(), 0);
    }

    #[test]
    fn a_clients_name_never_becomes_a_label() {
        let m = Metrics::new();
        m.sds.pushed("default");
        m.sds.pushed("attacker-chosen-name");
        m.sds.refused(Refusal::Limits);
        let text = m.encode(Format::Prometheus);
        for line in [
            "node_agent_sds_pushes_total{resource=\"default\"} 1\n",
            "node_agent_sds_pushes_total{resource=\"ROOTCA\"} 0\n",
            "node_agent_sds_pushes_total{resource=\"ALL\"} 0\n",
            "node_agent_sds_pushes_total{resource=\"other\"} 1\n",
            "node_agent_sds_requests_refused_total{reason=\"limits\"} 1\n",
            "node_agent_sds_requests_refused_total{reason=\"credential\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("attacker"), "{text}");
    }
}

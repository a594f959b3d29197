//! What the agent holds, read from its [`AgentReport`] at each scrape (so
//! that it cannot drift from the cache): `node_agent_identities_cached`,
//! `node_agent_ca_queue_depth`, `node_agent_tasks_alive` (of the runtime
//! scraped in), and per identity
//! `node_agent_certificate_expiry_timestamp_seconds`,
//! `node_agent_certificate_expires_in_seconds` and
//! `node_agent_certificate_renewal_timestamp_seconds`.
//!
//! The renewal time is shown only for identities a stream watches: the
//! agent renews only those, and forgets the others after
//! `SECRET_EVICTION_PERIOD`, so an unwatched identity past its renewal time
//! is not a renewal that failed. An alert on
//! `time() > node_agent_certificate_renewal_timestamp_seconds + margin`
//! therefore fires only for certificates that should have been renewed.
//!
//! `identity` is the only per-workload label: only cached identities carry
//! it, and the cache holds at most `MAX_IDENTITIES`. The series with it are
//! one [`Part`] and the node-wide gauges another, registered apart, so that
//! metrics can be served without the per-workload series.

use std::sync::{Arc, RwLock, Weak};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use super::{AgentReport, IdentityReport};

/// The agent state read at scrape time; weak, so that metrics never keep a
/// stopped agent's cache alive.
#[derive(Default)]
pub(super) struct ReportSlot(RwLock<Option<Weak<dyn AgentReport>>>);

impl std::fmt::Debug for ReportSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReportSlot")
    }
}

impl ReportSlot {
    pub fn get(&self) -> Option<Arc<dyn AgentReport>> {
        self.0.read().ok()?.as_ref()?.upgrade()
    }

    pub fn set(&self, report: Weak<dyn AgentReport>) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(report);
        }
    }
}

/// Which series of the agent's state a [`StateCollector`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// The gauges of the whole node.
    NodeWide,
    /// The series labelled with an `identity`.
    PerIdentity,
}

/// Reads the agent's state at each scrape; nothing while no agent runs.
#[derive(Debug)]
pub(super) struct StateCollector(pub Arc<ReportSlot>, pub Part);

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(report) = self.0.get() else {
            return Ok(());
        };
        let identities = report.identities();
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        if self.1 == Part::NodeWide {
            gauge(
                &mut encoder,
                "identities_cached",
                "Workload identities in the cache (each with its key and certificate), at most MAX_IDENTITIES",
                identities.len() as i64,
            )?;
            gauge(
                &mut encoder,
                "ca_queue_depth",
                "CA requests waiting for a slot (CA_MAX_CONCURRENCY)",
                report.ca_queue_depth() as i64,
            )?;
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                gauge(
                    &mut encoder,
                    "tasks_alive",
                    "Tasks alive in the agent's runtime (connections, streams and their fetches): flat while clients come and go",
                    runtime.metrics().num_alive_tasks() as i64,
                )?;
            }
            return Ok(());
        }

        let now = unix_seconds(report.now());
        let expiry = |i: &IdentityReport| Some(unix_seconds(i.not_after?));
        let left = |i: &IdentityReport| Some(unix_seconds(i.not_after?) - now);
        let renewal =
            |i: &IdentityReport| (i.streams_open > 0).then_some(unix_seconds(i.renewal_due?));
        let gauge_type = ConstGauge::new(0i64).metric_type();
        for (name, help, value) in [
            (
                "certificate_expiry_timestamp_seconds",
                "When the identity's certificate expires, in seconds since the Unix epoch",
                &expiry as &dyn Fn(&IdentityReport) -> Option<i64>,
            ),
            (
                "certificate_expires_in_seconds",
                "Seconds left before the identity's certificate expires (negative once expired)",
                &left,
            ),
            (
                "certificate_renewal_timestamp_seconds",
                "When the identity's certificate falls due for renewal (failed attempts do not move it), in seconds since the Unix epoch; only identities a stream watches",
                &renewal,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, gauge_type)?;
            for i in &identities {
                if let Some(v) = value(i) {
                    let labels = [("identity", i.identity.as_str())];
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

pub(super) fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, IdentityReport, Metrics};
    use std::time::Duration;

    struct Fixed(Vec<IdentityReport>);

    impl AgentReport for Fixed {
        fn identities(&self) -> Vec<IdentityReport> {
            self.0.clone()
        }
        fn ca_queue_depth(&self) -> usize {
            3
        }
        fn now(&self) -> SystemTime {
            SystemTime::UNIX_EPOCH + Duration::from_secs(NOW)
        }
    }

    /// The agent's clock reads this, far from the system clock's now.
    const NOW: u64 = 1_000_000_000;

    #[test]
    fn state_is_read_at_scrape_time_and_only_while_the_agent_lives() {
        let m = Metrics::new();
        assert!(!m.encode(Format::Prometheus).contains("identities_cached"));
        let in_an_hour = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW + 3600);
        let in_half_an_hour = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW + 1800);
        let report: Arc<dyn AgentReport> = Arc::new(Fixed(vec![
            IdentityReport {
                identity: "spiffe://td/ns/a/sa/b".into(),
                not_after: Some(in_an_hour),
                renewal_due: Some(in_half_an_hour),
                streams_open: 1,
                ..IdentityReport::default()
            },
            IdentityReport {
                identity: "spiffe://td/ns/a/sa/first-fetch-running".into(),
                ..IdentityReport::default()
            },
            IdentityReport {
                identity: "spiffe://td/ns/a/sa/unwatched".into(),
                not_after: Some(in_an_hour),
                renewal_due: Some(in_half_an_hour),
                streams_open: 0,
                ..IdentityReport::default()
            },
        ]));
        m.set_report(Arc::downgrade(&report));
        let text = m.encode(Format::Prometheus);
        assert!(text.contains("node_agent_identities_cached 3\n"), "{text}");
        assert!(text.contains("node_agent_ca_queue_depth 3\n"), "{text}");
        let ts = format!(
            "node_agent_certificate_expiry_timestamp_seconds{{identity=\"spiffe://td/ns/a/sa/b\"}} {}\n",
            unix_seconds(in_an_hour)
        );
        assert!(text.contains(&ts), "{text}");
        let left = text
            .lines()
            .find_map(|l| l.strip_prefix("node_agent_certificate_expires_in_seconds{identity=\"spiffe://td/ns/a/sa/b\"} "))
            .expect("seconds left");
        assert_eq!(left, "3600", "counted from the agent's clock");
        let due = format!(
            "node_agent_certificate_renewal_timestamp_seconds{{identity=\"spiffe://td/ns/a/sa/b\"}} {}\n",
            NOW + 1800
        );
        assert!(text.contains(&due), "{text}");
        assert!(
            !text.contains("node_agent_certificate_renewal_timestamp_seconds{identity=\"spiffe://td/ns/a/sa/unwatched\"}"),
            "not renewed while nobody watches, so no renewal time: {text}"
        );
        assert!(
            text.contains("node_agent_certificate_expiry_timestamp_seconds{identity=\"spiffe://td/ns/a/sa/unwatched\"}"),
            "{text}"
        );
        assert!(
            !text.contains("first-fetch-running"),
            "no expiry without a certificate: {text}"
        );
        drop(report);
        let text = m.encode(Format::Prometheus);
        assert!(!text.contains("identities_cached"), "{text}");
    }

    #[test]
    fn node_wide_leaves_out_every_series_labelled_with_an_identity() {
        let m = Metrics::new();
        let report: Arc<dyn AgentReport> = Arc::new(Fixed(vec![IdentityReport {
            identity: "spiffe://td/ns/a/sa/b".into(),
            not_after: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW + 60)),
            ..IdentityReport::default()
        }]));
        m.set_report(Arc::downgrade(&report));
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let all = m.encode(format);
            assert!(
                all.contains("{identity=\"spiffe://td/ns/a/sa/b\"}"),
                "{all}"
            );
            let node = m.encode_node_wide(format);
            assert!(!node.contains("identity="), "{node}");
            assert!(!node.contains("spiffe://"), "{node}");
            assert!(node.contains("node_agent_identities_cached 1\n"), "{node}");
            assert!(node.contains("node_agent_ca_queue_depth 3\n"), "{node}");
            assert!(node.contains("node_agent_rotations_total"), "{node}");
            if format == Format::OpenMetrics {
                assert!(all.ends_with("# EOF\n") && node.ends_with("# EOF\n"));
                assert_eq!(all.matches("# EOF").count(), 1, "{all}");
            }
        }
    }
}

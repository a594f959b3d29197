//! What the agent holds, read from its [`AgentReport`] at each scrape (so
//! that it cannot drift from the cache).
//!
//! Node-wide, shown to every scraper: `node_agent_identities_cached`,
//! `node_agent_ca_queue_depth`, `node_agent_tasks_alive` (of the runtime
//! scraped in), and over the watched identities (those a stream watches)
//! `node_agent_certificates_renewal_overdue`,
//! `node_agent_certificates_expired`,
//! `node_agent_certificate_earliest_expiry_timestamp_seconds` and
//! `node_agent_certificate_earliest_renewal_timestamp_seconds`. The two
//! counts are what the certificate alerts read: they fire on them without
//! any series naming a workload.
//!
//! Per identity: `node_agent_certificate_expiry_timestamp_seconds`,
//! `node_agent_certificate_expires_in_seconds` and
//! `node_agent_certificate_renewal_timestamp_seconds`.
//!
//! Only watched identities count for renewals: the agent renews only those,
//! and forgets the others after `SECRET_EVICTION_PERIOD`, so an unwatched
//! identity past its renewal time is not a renewal that failed.
//!
//! `identity` is the only per-workload label: only cached identities carry
//! it, and the cache holds at most `MAX_IDENTITIES`. The series with it are
//! one [`Part`] and the node-wide gauges another, registered apart, so that
//! metrics can be served without the per-workload series.

use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

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
            let now = report.now();
            let watched: Vec<&IdentityReport> =
                identities.iter().filter(|i| i.streams_open > 0).collect();
            gauge(
                &mut encoder,
                "certificates_renewal_overdue",
                "Watched identities whose certificate is still served past its renewal time by more than a tenth of its renewal-to-expiry time (20 s to 1 h); expired ones included",
                watched.iter().filter(|i| renewal_overdue(i, now)).count() as i64,
            )?;
            gauge(
                &mut encoder,
                "certificates_expired",
                "Watched identities whose served certificate has expired",
                watched.iter().filter(|i| expired(i, now)).count() as i64,
            )?;
            for (name, help, earliest) in [
                (
                    "certificate_earliest_expiry_timestamp_seconds",
                    "When the first certificate of a watched identity expires, in seconds since the Unix epoch",
                    watched.iter().filter_map(|i| i.not_after).min(),
                ),
                (
                    "certificate_earliest_renewal_timestamp_seconds",
                    "When the first certificate of a watched identity falls due for renewal (failed attempts do not move it), in seconds since the Unix epoch",
                    watched.iter().filter_map(|i| i.renewal_due).min(),
                ),
            ] {
                if let Some(t) = earliest {
                    gauge(&mut encoder, name, help, unix_seconds(t))?;
                }
            }
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

/// The least time a renewal may be late before it counts as overdue: longer
/// than one Vault request may take (`VAULT_REQUEST_TIMEOUT`, 15 s by
/// default), so that a renewal in flight is not called overdue.
const OVERDUE_MARGIN_MIN: Duration = Duration::from_secs(20);
/// The most: 24 h certificates renewed at half their life count as overdue
/// an hour after their renewal time, 11 h before they expire.
const OVERDUE_MARGIN_MAX: Duration = Duration::from_secs(3600);

/// How late past `due` the renewal of a certificate expiring at `not_after`
/// may be before it is overdue: a tenth of the time between the two, within
/// [`OVERDUE_MARGIN_MIN`, `OVERDUE_MARGIN_MAX`].
fn overdue_margin(due: SystemTime, not_after: SystemTime) -> Duration {
    let span = not_after.duration_since(due).unwrap_or_default();
    (span / 10).clamp(OVERDUE_MARGIN_MIN, OVERDUE_MARGIN_MAX)
}

/// The identity's certificate is served more than its margin past its
/// renewal time (counted from the agent's clock, `now`). The caller keeps
/// only watched identities.
fn renewal_overdue(i: &IdentityReport, now: SystemTime) -> bool {
    let (Some(due), Some(not_after)) = (i.renewal_due, i.not_after) else {
        return false;
    };
    now.duration_since(due)
        .is_ok_and(|late| late > overdue_margin(due, not_after))
}

/// The identity's served certificate has expired by the agent's clock.
fn expired(i: &IdentityReport, now: SystemTime) -> bool {
    i.not_after.is_some_and(|not_after| not_after <= now)
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
            for name in [
                "node_agent_certificates_renewal_overdue 0\n",
                "node_agent_certificates_expired 0\n",
            ] {
                assert!(node.contains(name), "{node}");
            }
            if format == Format::OpenMetrics {
                assert!(all.ends_with("# EOF\n") && node.ends_with("# EOF\n"));
                assert_eq!(all.matches("# EOF").count(), 1, "{all}");
            }
        }
    }

    /// A watched identity due for renewal `late` seconds ago (negative: not
    /// yet), whose certificate expires `span` seconds after its renewal time.
    fn due(late: i64, span: i64) -> IdentityReport {
        let at = |s: i64| SystemTime::UNIX_EPOCH + Duration::from_secs((NOW as i64 + s) as u64);
        IdentityReport {
            identity: format!("spiffe://td/ns/a/sa/late-{late}-span-{span}"),
            renewal_due: Some(at(-late)),
            not_after: Some(at(span - late)),
            streams_open: 1,
            ..IdentityReport::default()
        }
    }

    /// The margin is a tenth of the renewal-to-expiry time, at least 20 s and
    /// at most an hour, and a renewal is overdue only once strictly past it.
    #[test]
    fn a_renewal_is_overdue_past_a_tenth_of_its_renewal_to_expiry_time_within_20s_to_1h() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        for (late, span, overdue) in [
            (-10, 1200, false),
            (0, 1200, false),
            // A tenth of 1200 s: 120 s.
            (120, 1200, false),
            (121, 1200, true),
            // A tenth of 100 s is 10 s: the 20 s floor.
            (15, 100, false),
            (20, 100, false),
            (21, 100, true),
            // 24 h certificates renewed at half their life: the 1 h cap.
            (3600, 43_200, false),
            (3601, 43_200, true),
            // Expired, and still overdue.
            (200, 100, true),
            // Expiring before its renewal time: the floor.
            (21, -50, true),
        ] {
            assert_eq!(
                renewal_overdue(&due(late, span), now),
                overdue,
                "{late} s late, {span} s to expiry"
            );
        }
    }

    /// The node-wide counts and earliest times cover the watched identities
    /// only, and name none of them.
    #[test]
    fn node_wide_counts_watched_identities_overdue_and_expired() {
        let m = Metrics::new();
        let unwatched = |mut i: IdentityReport| {
            i.streams_open = 0;
            i
        };
        let report: Arc<dyn AgentReport> = Arc::new(Fixed(vec![
            due(100, 1200),
            due(121, 1200),
            due(21, 100),
            due(150, 100),
            due(-30, 1200),
            unwatched(due(5000, 1000)),
            IdentityReport {
                identity: "spiffe://td/ns/a/sa/first-fetch-running".into(),
                streams_open: 1,
                ..IdentityReport::default()
            },
        ]));
        m.set_report(Arc::downgrade(&report));
        let node = m.encode_node_wide(Format::Prometheus);
        assert!(!node.contains("spiffe://"), "{node}");
        for line in [
            "node_agent_certificates_renewal_overdue 3\n".to_string(),
            "node_agent_certificates_expired 1\n".to_string(),
            format!(
                "node_agent_certificate_earliest_expiry_timestamp_seconds {}\n",
                NOW - 50
            ),
            format!(
                "node_agent_certificate_earliest_renewal_timestamp_seconds {}\n",
                NOW - 150
            ),
        ] {
            assert!(node.contains(&line), "no {line:?} in\n{node}");
        }

        let idle: Arc<dyn AgentReport> = Arc::new(Fixed(vec![unwatched(due(5000, 1000))]));
        m.set_report(Arc::downgrade(&idle));
        let node = m.encode_node_wide(Format::Prometheus);
        assert!(
            node.contains("node_agent_certificates_renewal_overdue 0\n"),
            "{node}"
        );
        assert!(
            node.contains("node_agent_certificates_expired 0\n"),
            "{node}"
        );
        assert!(!node.contains("earliest"), "no watched identity: {node}");
    }
}

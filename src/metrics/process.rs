//! The agent process itself, under the names every Prometheus client library
//! exports (no `node_agent_` prefix, so that generic dashboards and alerts
//! work): `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_cpu_seconds_total`, `process_open_fds` and
//! `process_start_time_seconds`. Read from `/proc/self` at each scrape; on a
//! system without `/proc` (not Linux) they are absent.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on every
/// Linux architecture).
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc` says of this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessFacts {
    resident_bytes: u64,
    virtual_bytes: u64,
    cpu_seconds: f64,
    open_fds: u64,
    start_time_seconds: f64,
}

/// The facts from the texts of `/proc/self/status`, `/proc/self/stat` and
/// `/proc/stat`; `None` when one is not as Linux writes it.
fn parse(status: &str, stat: &str, system_stat: &str, open_fds: u64) -> Option<ProcessFacts> {
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(key))?;
        line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
    };
    // The fields after the command name, which is in parentheses and may
    // hold spaces: the 3rd field (state) first.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    let boot: f64 = system_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(ProcessFacts {
        resident_bytes: kib("VmRSS:")? * 1024,
        virtual_bytes: kib("VmSize:")? * 1024,
        cpu_seconds: (field(14)? + field(15)?) / TICKS_PER_SECOND,
        open_fds,
        start_time_seconds: boot + field(22)? / TICKS_PER_SECOND,
    })
}

fn read() -> Option<ProcessFacts> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let system_stat = std::fs::read_to_string("/proc/stat").ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    parse(&status, &stat, &system_stat, open_fds)
}

/// Reads `/proc` at each scrape.
#[derive(Debug)]
pub(super) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = read() else {
            return Ok(());
        };
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: f64| {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_bytes as f64,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_bytes as f64,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Open file descriptors",
            p.open_fds as f64,
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            p.start_time_seconds,
        )?;
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, Metrics};

    #[test]
    fn parses_what_linux_writes() {
        let status = "Name:\tnode-agent\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\nThreads:\t4\n";
        // pid (comm) state ppid ... utime=250 stime=50 ... starttime=1000
        let stat = "42 (node agent) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 126418944 512 18446744073709551615";
        let system = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        assert_eq!(
            parse(status, stat, system, 7),
            Some(ProcessFacts {
                resident_bytes: 2048 * 1024,
                virtual_bytes: 123456 * 1024,
                cpu_seconds: 3.0,
                open_fds: 7,
                start_time_seconds: 1_700_000_010.0,
            })
        );
        assert_eq!(parse("VmRSS: 1 MB\n", stat, system, 0), None);
        assert_eq!(parse(status, "42 (x", system, 0), None);
    }

    #[test]
    fn exported_without_the_prefix() {
        let text = Metrics::new().encode(Format::Prometheus);
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e5, "{text}");
        assert!(value("process_open_fds") >= 1.0, "{text}");
        assert!(value("process_cpu_seconds_total") >= 0.0, "{text}");
        let start = value("process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(start <= now + 1.0 && start > now - 86400.0, "{start} {now}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(!text.contains("node_agent_process"), "{text}");
    }
}

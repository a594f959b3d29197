//! How the agent can be watched: the status server's address
//! (`STATUS_ADDR`, flag `--status-addr`), its bounds (`STATUS_MAX_CONNECTIONS`,
//! `STATUS_PROBE_CONNECTIONS`, `STATUS_MAX_PENDING_CONNECTIONS`,
//! `STATUS_HEADER_TIMEOUT`, `STATUS_MAX_HEADER_BYTES`,
//! `STATUS_CONNECTION_LIFETIME`) and who sees its per-workload pages
//! (`STATUS_DEBUG_FROM`), and the log format and filter (`LOG_FORMAT`,
//! `LOG_LEVEL`, `RUST_LOG`).
//!
//! The binary reads the log settings before everything else (to log the
//! other settings' errors), and [`super::Config`] reads them again so that
//! one parser knows every setting.

use std::net::SocketAddr;
use std::time::Duration;

use super::debug_from::DebugFrom;
use super::limits::{parse_bytes, show_bytes};
use super::ConfigError;
use crate::duration::parse_go_duration;

/// The status server's default address: all interfaces, the port istio-agent uses.
pub const DEFAULT_STATUS_ADDR: &str = "0.0.0.0:15020";

/// What the log lines look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people: one line per event, as `tracing` prints it.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line.
    Json,
}

/// The log settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogSettings {
    /// `LOG_FORMAT`: `text` (default) or `json`.
    pub format: LogFormat,
    /// `LOG_LEVEL`, else `RUST_LOG`: a `tracing` filter such as `info` or
    /// `node_agent=debug`; `None` means `info`.
    pub filter: Option<String>,
}

impl LogSettings {
    /// Reads `LOG_FORMAT`, `LOG_LEVEL` and `RUST_LOG` through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let format = match get("LOG_FORMAT") {
            None => LogFormat::Text,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::new(
                        "LOG_FORMAT",
                        v,
                        "accepted values are text and json",
                    ))
                }
            },
        };
        let filter = get("LOG_LEVEL").or_else(|| get("RUST_LOG"));
        Ok(Self { format, filter })
    }

    /// Reads them from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

/// The status server's bounds: whoever reaches its port may ask, so
/// connections, the time and bytes of a request head and a connection's
/// life are capped. Health probes have places of their own, so that clients
/// holding every other place never fail kubelet's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusLimits {
    /// `STATUS_MAX_CONNECTIONS`: connections served other than health
    /// probes (scrapers, people), each from its first request on and while
    /// kept alive; one more is answered 503 and closed.
    pub max_connections: usize,
    /// `STATUS_PROBE_CONNECTIONS`: health probes answered at once, on places
    /// only a probe's request can take; one more is answered 503. Kubelet
    /// runs at most three probes per container at a time.
    pub probe_connections: usize,
    /// `STATUS_MAX_PENDING_CONNECTIONS`: connections whose first request
    /// head is not complete yet; one more closes the oldest of them.
    pub max_pending: usize,
    /// `STATUS_HEADER_TIMEOUT`: time a connection has to send a request
    /// head, its first or the next one while kept alive; then it is closed.
    pub header_timeout: Duration,
    /// `STATUS_MAX_HEADER_BYTES`: largest request head; a larger one is
    /// answered 431 and its connection closed.
    pub max_header_bytes: usize,
    /// `STATUS_CONNECTION_LIFETIME`: longest life of one connection,
    /// keep-alive included.
    pub connection_lifetime: Duration,
}

impl Default for StatusLimits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            probe_connections: 8,
            max_pending: 64,
            header_timeout: Duration::from_secs(5),
            max_header_bytes: 8 << 10,
            connection_lifetime: Duration::from_secs(120),
        }
    }
}

/// Status server and log settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveConfig {
    /// Where the status server (health, metrics, debug) listens; `None` turns it off.
    pub status_addr: Option<SocketAddr>,
    pub status_limits: StatusLimits,
    /// `STATUS_DEBUG_FROM`: who is shown `/debug/identities` and the
    /// per-identity metric series.
    pub status_debug_from: DebugFrom,
    pub log: LogSettings,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        Self {
            status_addr: Some(DEFAULT_STATUS_ADDR.parse().expect("default status address")),
            status_limits: StatusLimits::default(),
            status_debug_from: DebugFrom::default(),
            log: LogSettings::default(),
        }
    }
}

/// Reads the observability settings. Unlike the other settings, an empty
/// `STATUS_ADDR` is not the same as an unset one: it turns the server off.
pub(super) fn observe_from_lookup(
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<ObserveConfig, ConfigError> {
    let status_addr = match lookup("STATUS_ADDR") {
        None => ObserveConfig::default().status_addr,
        Some(v) => parse_status_addr("STATUS_ADDR", &v)?,
    };
    Ok(ObserveConfig {
        status_addr,
        status_limits: status_limits_from_lookup(lookup)?,
        status_debug_from: DebugFrom::from_lookup(lookup)?,
        log: LogSettings::from_lookup(lookup)?,
    })
}

fn status_limits_from_lookup(
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<StatusLimits, ConfigError> {
    let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
    let d = StatusLimits::default();
    let count = |var: &'static str, default: usize, max: usize| match get(var) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                var,
                v,
                format!("must be a whole number from 1 to {max}"),
            )),
        },
    };
    let max_header_bytes = match get("STATUS_MAX_HEADER_BYTES") {
        None => d.max_header_bytes,
        Some(v) => match parse_bytes(&v) {
            Some(n) if (MIN_STATUS_HEADER_BYTES..=MAX_STATUS_HEADER_BYTES).contains(&n) => n,
            _ => {
                return Err(ConfigError::new(
                    "STATUS_MAX_HEADER_BYTES",
                    v,
                    format!(
                        "must be a size from {} to {} (bytes, or with KiB / MiB)",
                        show_bytes(MIN_STATUS_HEADER_BYTES),
                        show_bytes(MAX_STATUS_HEADER_BYTES)
                    ),
                ))
            }
        },
    };
    let duration =
        |var: &'static str, default: Duration, min: Duration, max: Duration| match get(var) {
            None => Ok(default),
            Some(v) => match parse_go_duration(&v) {
                Ok(t) if t >= min && t <= max => Ok(t),
                Ok(_) => Err(ConfigError::new(
                    var,
                    v,
                    format!("must be from {min:?} to {max:?}"),
                )),
                Err(e) => Err(ConfigError::new(var, v, e.to_string())),
            },
        };
    Ok(StatusLimits {
        max_connections: count(
            "STATUS_MAX_CONNECTIONS",
            d.max_connections,
            MAX_STATUS_CONNECTIONS,
        )?,
        probe_connections: count(
            "STATUS_PROBE_CONNECTIONS",
            d.probe_connections,
            MAX_STATUS_CONNECTIONS,
        )?,
        max_pending: count(
            "STATUS_MAX_PENDING_CONNECTIONS",
            d.max_pending,
            MAX_STATUS_CONNECTIONS,
        )?,
        max_header_bytes,
        header_timeout: duration(
            "STATUS_HEADER_TIMEOUT",
            d.header_timeout,
            Duration::from_millis(100),
            Duration::from_secs(300),
        )?,
        connection_lifetime: duration(
            "STATUS_CONNECTION_LIFETIME",
            d.connection_lifetime,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?,
    })
}

/// Most `STATUS_MAX_CONNECTIONS`, `STATUS_PROBE_CONNECTIONS` and
/// `STATUS_MAX_PENDING_CONNECTIONS`: each place costs a task and a socket.
const MAX_STATUS_CONNECTIONS: usize = 4096;

/// Least `STATUS_MAX_HEADER_BYTES`: the HTTP server's read buffer is never
/// smaller, and browsers send a few KiB.
const MIN_STATUS_HEADER_BYTES: usize = 8 << 10;
/// Most `STATUS_MAX_HEADER_BYTES`: a pending connection may hold this much.
const MAX_STATUS_HEADER_BYTES: usize = 1 << 20;

/// Parses a status server address: `IP:PORT`, `[IPv6]:PORT`, or `:PORT` for
/// all interfaces; empty (or only spaces) means off. `var` names the source
/// (`STATUS_ADDR` or `--status-addr`) in the error.
pub fn parse_status_addr(var: &'static str, v: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let t = v.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let full = match t.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => t.to_string(),
    };
    full.parse::<SocketAddr>().map(Some).map_err(|_| {
        ConfigError::new(
            var,
            v,
            "must be IP:PORT such as 0.0.0.0:15020 or 127.0.0.1:15020 (or :PORT), or empty to turn the status server off",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn observe(vars: &[(&str, &str)]) -> Result<ObserveConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        observe_from_lookup(&|k: &str| map.get(k).cloned())
    }

    #[test]
    fn status_addr_default_off_and_forms() {
        let addr = |s: &str| observe(&[("STATUS_ADDR", s)]).unwrap().status_addr;
        assert_eq!(
            observe(&[]).unwrap().status_addr,
            Some("0.0.0.0:15020".parse().unwrap())
        );
        assert_eq!(addr(""), None, "empty turns the server off");
        assert_eq!(addr("  "), None);
        assert_eq!(addr("127.0.0.1:9"), Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(addr(":15021"), Some("0.0.0.0:15021".parse().unwrap()));
        assert_eq!(addr("[::1]:15020"), Some("[::1]:15020".parse().unwrap()));
        for bad in ["15020", "localhost:15020", "0.0.0.0", "1.2.3.4:99999"] {
            let e = observe(&[("STATUS_ADDR", bad)]).unwrap_err();
            assert_eq!(e.var, "STATUS_ADDR", "{bad}");
            assert_eq!(e.value, bad);
        }
        assert_eq!(
            parse_status_addr("--status-addr", "nope").unwrap_err().var,
            "--status-addr"
        );
    }

    #[test]
    fn status_limits_defaults_forms_and_bounds() {
        let limits = |vars: &[(&str, &str)]| observe(vars).map(|o| o.status_limits);
        assert_eq!(
            limits(&[]).unwrap(),
            StatusLimits {
                max_connections: 32,
                probe_connections: 8,
                max_pending: 64,
                header_timeout: Duration::from_secs(5),
                max_header_bytes: 8192,
                connection_lifetime: Duration::from_secs(120),
            }
        );
        let set = limits(&[
            ("STATUS_MAX_CONNECTIONS", "4"),
            ("STATUS_PROBE_CONNECTIONS", "2"),
            ("STATUS_MAX_PENDING_CONNECTIONS", "16"),
            ("STATUS_HEADER_TIMEOUT", "250ms"),
            ("STATUS_MAX_HEADER_BYTES", "16KiB"),
            ("STATUS_CONNECTION_LIFETIME", "2m"),
        ])
        .unwrap();
        assert_eq!(set.max_connections, 4);
        assert_eq!(set.probe_connections, 2);
        assert_eq!(set.max_pending, 16);
        assert_eq!(set.max_header_bytes, 16384);
        assert_eq!(set.header_timeout, Duration::from_millis(250));
        assert_eq!(set.connection_lifetime, Duration::from_secs(120));
        assert_eq!(
            limits(&[("STATUS_MAX_CONNECTIONS", "")]).unwrap(),
            StatusLimits::default(),
            "empty is unset"
        );
        for (var, bad) in [
            ("STATUS_MAX_CONNECTIONS", "0"),
            ("STATUS_MAX_CONNECTIONS", "4097"),
            ("STATUS_MAX_CONNECTIONS", "many"),
            ("STATUS_PROBE_CONNECTIONS", "0"),
            ("STATUS_MAX_PENDING_CONNECTIONS", "5000"),
            ("STATUS_MAX_HEADER_BYTES", "4KiB"),
            ("STATUS_MAX_HEADER_BYTES", "2MiB"),
            ("STATUS_MAX_HEADER_BYTES", "lots"),
            ("STATUS_HEADER_TIMEOUT", "10ms"),
            ("STATUS_HEADER_TIMEOUT", "1h"),
            ("STATUS_HEADER_TIMEOUT", "5"),
            ("STATUS_CONNECTION_LIFETIME", "500ms"),
            ("STATUS_CONNECTION_LIFETIME", "25h"),
        ] {
            let e = limits(&[(var, bad)]).unwrap_err();
            assert_eq!((e.var, e.value.as_str()), (var, bad));
        }
    }

    #[test]
    fn log_settings() {
        let log = |vars: &[(&str, &str)]| observe(vars).map(|o| o.log);
        assert_eq!(log(&[]).unwrap(), LogSettings::default());
        assert_eq!(
            log(&[("LOG_FORMAT", "JSON")]).unwrap().format,
            LogFormat::Json
        );
        assert_eq!(
            log(&[("LOG_FORMAT", "text")]).unwrap().format,
            LogFormat::Text
        );
        assert_eq!(log(&[("LOG_FORMAT", "")]).unwrap().format, LogFormat::Text);
        assert_eq!(
            log(&[("LOG_FORMAT", "yaml")]).unwrap_err().var,
            "LOG_FORMAT"
        );
        assert_eq!(
            log(&[("RUST_LOG", "debug")]).unwrap().filter.as_deref(),
            Some("debug")
        );
        assert_eq!(
            log(&[("RUST_LOG", "debug"), ("LOG_LEVEL", "warn")])
                .unwrap()
                .filter
                .as_deref(),
            Some("warn"),
            "LOG_LEVEL wins over RUST_LOG"
        );
    }
}

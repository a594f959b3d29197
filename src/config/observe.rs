//! How the agent can be watched: the status server's address
//! (`STATUS_ADDR`, flag `--status-addr`) and bounds (`STATUS_MAX_CONNECTIONS`,
//! `STATUS_HEADER_TIMEOUT`, `STATUS_CONNECTION_LIFETIME`), and the log format
//! and filter (`LOG_FORMAT`, `LOG_LEVEL`, `RUST_LOG`).
//!
//! The binary reads the log settings before everything else (to log the
//! other settings' errors), and [`super::Config`] reads them again so that
//! one parser knows every setting.

use std::net::SocketAddr;
use std::time::Duration;

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
/// connections, the time to send a request head and a connection's life
/// are capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusLimits {
    /// `STATUS_MAX_CONNECTIONS`: connections served at once; one more is
    /// closed at once. Kubelet's probes and a Prometheus or two need a few.
    pub max_connections: usize,
    /// `STATUS_HEADER_TIMEOUT`: time a connection has to send its request
    /// head; then it is closed.
    pub header_timeout: Duration,
    /// `STATUS_CONNECTION_LIFETIME`: longest life of one connection,
    /// keep-alive included.
    pub connection_lifetime: Duration,
}

impl Default for StatusLimits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            header_timeout: Duration::from_secs(5),
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
    pub log: LogSettings,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        Self {
            status_addr: Some(DEFAULT_STATUS_ADDR.parse().expect("default status address")),
            status_limits: StatusLimits::default(),
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
        log: LogSettings::from_lookup(lookup)?,
    })
}

fn status_limits_from_lookup(
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<StatusLimits, ConfigError> {
    let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
    let d = StatusLimits::default();
    let max_connections = match get("STATUS_MAX_CONNECTIONS") {
        None => d.max_connections,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_STATUS_CONNECTIONS).contains(&n) => n,
            _ => {
                return Err(ConfigError::new(
                    "STATUS_MAX_CONNECTIONS",
                    v,
                    format!("must be a whole number from 1 to {MAX_STATUS_CONNECTIONS}"),
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
        max_connections,
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

/// Most `STATUS_MAX_CONNECTIONS`: each costs a task and a socket.
const MAX_STATUS_CONNECTIONS: usize = 4096;

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
                header_timeout: Duration::from_secs(5),
                connection_lifetime: Duration::from_secs(120),
            }
        );
        let set = limits(&[
            ("STATUS_MAX_CONNECTIONS", "4"),
            ("STATUS_HEADER_TIMEOUT", "250ms"),
            ("STATUS_CONNECTION_LIFETIME", "2m"),
        ])
        .unwrap();
        assert_eq!(set.max_connections, 4);
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

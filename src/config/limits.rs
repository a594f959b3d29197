//! The bounds of the SDS server (`SDS_*`): every workload that can reach the
//! socket may be hostile, so connections, streams, request sizes, resource
//! names and the Vault logins one connection can cause are all capped, and
//! each peer (a pod, by default) has a share of each (`SDS_PEER_*`). Each
//! bound is a setting with a default sized for a node of Envoys (two streams
//! each); the settings table of docs/settings.md lists them.

use std::time::Duration;

use super::ConfigError;
use crate::duration::parse_go_duration;

/// The SDS server's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsLimits {
    /// `SDS_MAX_CONNECTIONS`: open connections on the socket; past it a new
    /// connection is closed at once. Envoy's `google_grpc` opens one
    /// connection per SDS stream, so two per Envoy.
    pub max_connections: usize,
    /// `SDS_MAX_STREAMS`: open gRPC streams (StreamSecrets and FetchSecrets
    /// calls) over all connections.
    pub max_streams: usize,
    /// `SDS_CONNECTION_MAX_STREAMS`: open streams on one connection. An Envoy
    /// opens two (`default` and `ROOTCA`).
    pub connection_max_streams: usize,
    /// `SDS_FIRST_REQUEST_TIMEOUT`: a stream whose first request has not
    /// fully arrived by then is closed; so is one whose later request is not
    /// complete this long after its first byte.
    pub first_request_timeout: Duration,
    /// `SDS_HANDSHAKE_TIMEOUT`: a connection that has opened no stream this
    /// long after it was accepted is closed.
    pub handshake_timeout: Duration,
    /// `SDS_KEEPALIVE_INTERVAL`: HTTP/2 PING interval on every connection.
    pub keepalive_interval: Duration,
    /// `SDS_KEEPALIVE_TIMEOUT`: a connection whose PING is not answered by
    /// then is closed with its streams.
    pub keepalive_timeout: Duration,
    /// `SDS_MAX_REQUEST_BYTES`: largest request message accepted. An Envoy
    /// sends its node, with the list of every extension it was built with,
    /// in each request: about 60 KiB for Envoy 1.40.
    pub max_request_bytes: usize,
    /// `SDS_MAX_BUFFERED_REQUEST_BYTES`: bytes of requests not yet complete
    /// held over all streams; a stream past it waits.
    pub max_buffered_request_bytes: usize,
    /// `SDS_MAX_HEADER_BYTES`: largest header list (metadata, with the JWT).
    pub max_header_bytes: u32,
    /// `SDS_MAX_RESOURCE_NAMES`: most distinct resource names in one request.
    pub max_resource_names: usize,
    /// `SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT`: first fetches with JWTs new to
    /// its peer that one connection may have waiting on the CA at once.
    pub connection_max_logins_in_flight: usize,
    /// `SDS_CONNECTION_NEW_JWT_BURST`: JWTs new to its peer a connection may
    /// present at once before the rate applies (token bucket size).
    pub connection_new_jwt_burst: u32,
    /// `SDS_CONNECTION_NEW_JWT_INTERVAL`: after the burst, one more new JWT
    /// per connection per this interval (token bucket refill).
    pub connection_new_jwt_interval: Duration,
    /// `SDS_PEER`: what a peer is, whose shares the `SDS_PEER_*` settings
    /// bound (see [`PeerMode`]).
    pub peer: PeerMode,
    /// `SDS_PEER_MAX_CONNECTIONS`: open connections of one peer.
    pub peer_max_connections: usize,
    /// `SDS_PEER_MAX_STREAMS`: open streams of one peer, over its
    /// connections.
    pub peer_max_streams: usize,
    /// `SDS_PEER_MAX_LOGINS_IN_FLIGHT`: first fetches with JWTs new to a
    /// peer that may wait on the CA at once, over its connections.
    pub peer_max_logins_in_flight: usize,
    /// `SDS_PEER_NEW_JWT_BURST`: JWTs new to a peer it may present at once
    /// before the rate applies; reconnecting does not refill it.
    pub peer_new_jwt_burst: u32,
    /// `SDS_PEER_NEW_JWT_INTERVAL`: after the burst, one more new JWT per
    /// peer per this interval.
    pub peer_new_jwt_interval: Duration,
    /// `SDS_PEER_MAX_IDENTITIES`: identities one peer may add to the cache
    /// (first fetches of identities not cached yet), of `MAX_IDENTITIES`.
    pub peer_max_identities: usize,
}

impl std::fmt::Display for PeerMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerMode::Cgroup => "cgroup",
            PeerMode::Pid => "pid",
            PeerMode::Uid => "uid",
        })
    }
}

/// What one peer of the socket is: the client whose connections share the
/// `SDS_PEER_*` bounds. Read from `SO_PEERCRED` of each accepted connection;
/// when the kernel cannot say (no pid, `/proc` unreadable, the process gone),
/// the peer is the connection's uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    /// The control group of the peer's process, up to its pod's (in
    /// Kubernetes every pod has its own): a peer is a pod.
    Cgroup,
    /// The peer's process id: a peer is a process.
    Pid,
    /// The peer's user id.
    Uid,
}

impl Default for SdsLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_streams: 512,
            connection_max_streams: 16,
            first_request_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_request_bytes: 256 * 1024,
            max_buffered_request_bytes: 8 << 20,
            max_header_bytes: 16 * 1024,
            max_resource_names: 8,
            connection_max_logins_in_flight: 2,
            connection_new_jwt_burst: 4,
            connection_new_jwt_interval: Duration::from_secs(10),
            peer: PeerMode::Cgroup,
            peer_max_connections: 32,
            peer_max_streams: 64,
            peer_max_logins_in_flight: 4,
            peer_new_jwt_burst: 8,
            peer_new_jwt_interval: Duration::from_secs(10),
            peer_max_identities: 8,
        }
    }
}

pub(super) fn limits_from_lookup(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<SdsLimits, ConfigError> {
    let d = SdsLimits::default();
    let count = |var: &'static str, default: usize, max: usize| -> Result<usize, ConfigError> {
        match get(var) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ConfigError::new(
                    var,
                    v,
                    format!("must be a whole number from 1 to {max}"),
                )),
            },
        }
    };
    let bytes = |var: &'static str, default: usize, min: usize, max: usize| match get(var) {
        None => Ok(default),
        Some(v) => match parse_bytes(&v) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                var,
                v,
                format!(
                    "must be a size from {} to {} (bytes, or with KiB / MiB)",
                    show_bytes(min),
                    show_bytes(max)
                ),
            )),
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
    let ms = Duration::from_millis;
    let hour = Duration::from_secs(3600);
    let limits = SdsLimits {
        max_connections: count("SDS_MAX_CONNECTIONS", d.max_connections, 1 << 20)?,
        max_streams: count("SDS_MAX_STREAMS", d.max_streams, 1 << 20)?,
        connection_max_streams: count(
            "SDS_CONNECTION_MAX_STREAMS",
            d.connection_max_streams,
            1 << 16,
        )?,
        first_request_timeout: duration(
            "SDS_FIRST_REQUEST_TIMEOUT",
            d.first_request_timeout,
            ms(100),
            hour,
        )?,
        handshake_timeout: duration("SDS_HANDSHAKE_TIMEOUT", d.handshake_timeout, ms(100), hour)?,
        keepalive_interval: duration(
            "SDS_KEEPALIVE_INTERVAL",
            d.keepalive_interval,
            ms(100),
            hour,
        )?,
        keepalive_timeout: duration("SDS_KEEPALIVE_TIMEOUT", d.keepalive_timeout, ms(100), hour)?,
        // An Envoy's first request carries its node (with every extension it
        // was built with): a few KiB, so 1 KiB is the least that makes sense.
        max_request_bytes: bytes("SDS_MAX_REQUEST_BYTES", d.max_request_bytes, 1024, 16 << 20)?,
        max_buffered_request_bytes: bytes(
            "SDS_MAX_BUFFERED_REQUEST_BYTES",
            d.max_buffered_request_bytes,
            1024,
            1 << 30,
        )?,
        max_header_bytes: bytes(
            "SDS_MAX_HEADER_BYTES",
            d.max_header_bytes as usize,
            4096,
            1 << 20,
        )? as u32,
        max_resource_names: count("SDS_MAX_RESOURCE_NAMES", d.max_resource_names, 1024)?,
        connection_max_logins_in_flight: count(
            "SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT",
            d.connection_max_logins_in_flight,
            1024,
        )?,
        connection_new_jwt_burst: count(
            "SDS_CONNECTION_NEW_JWT_BURST",
            d.connection_new_jwt_burst as usize,
            1 << 20,
        )? as u32,
        connection_new_jwt_interval: duration(
            "SDS_CONNECTION_NEW_JWT_INTERVAL",
            d.connection_new_jwt_interval,
            Duration::ZERO,
            hour * 24,
        )?,
        peer: match get("SDS_PEER") {
            None => d.peer,
            Some(v) => match v.trim() {
                "cgroup" => PeerMode::Cgroup,
                "pid" => PeerMode::Pid,
                "uid" => PeerMode::Uid,
                _ => {
                    return Err(ConfigError::new(
                        "SDS_PEER",
                        v,
                        "must be cgroup, pid or uid".to_string(),
                    ))
                }
            },
        },
        peer_max_connections: count("SDS_PEER_MAX_CONNECTIONS", d.peer_max_connections, 1 << 20)?,
        peer_max_streams: count("SDS_PEER_MAX_STREAMS", d.peer_max_streams, 1 << 20)?,
        peer_max_logins_in_flight: count(
            "SDS_PEER_MAX_LOGINS_IN_FLIGHT",
            d.peer_max_logins_in_flight,
            1 << 20,
        )?,
        peer_new_jwt_burst: count(
            "SDS_PEER_NEW_JWT_BURST",
            d.peer_new_jwt_burst as usize,
            1 << 20,
        )? as u32,
        peer_new_jwt_interval: duration(
            "SDS_PEER_NEW_JWT_INTERVAL",
            d.peer_new_jwt_interval,
            Duration::ZERO,
            hour * 24,
        )?,
        peer_max_identities: count("SDS_PEER_MAX_IDENTITIES", d.peer_max_identities, 1 << 20)?,
    };
    if limits.max_buffered_request_bytes < limits.max_request_bytes {
        return Err(ConfigError::new(
            "SDS_MAX_BUFFERED_REQUEST_BYTES",
            show_bytes(limits.max_buffered_request_bytes),
            format!(
                "must be at least SDS_MAX_REQUEST_BYTES ({}), or a request of that size could never be read",
                show_bytes(limits.max_request_bytes)
            ),
        ));
    }
    Ok(limits)
}

/// `65536`, `64KiB`, `1MiB` (also `K`/`KB`/`M`/`MB`, all binary).
pub(super) fn parse_bytes(v: &str) -> Option<usize> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub(super) fn show_bytes(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1024 && n % 1024 == 0 {
        format!("{}KiB", n >> 10)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn limits(vars: &[(&str, &str)]) -> Result<SdsLimits, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        limits_from_lookup(&|k: &str| map.get(k).cloned())
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(limits(&[]).unwrap(), SdsLimits::default());
        let l = limits(&[
            ("SDS_MAX_STREAMS", "64"),
            ("SDS_CONNECTION_MAX_STREAMS", "2"),
            ("SDS_MAX_REQUEST_BYTES", "16KiB"),
            ("SDS_MAX_HEADER_BYTES", "8192"),
            ("SDS_FIRST_REQUEST_TIMEOUT", "1500ms"),
            ("SDS_HANDSHAKE_TIMEOUT", "2s"),
            ("SDS_CONNECTION_NEW_JWT_INTERVAL", "0"),
            ("SDS_PEER", "pid"),
            ("SDS_PEER_MAX_STREAMS", "3"),
        ])
        .unwrap();
        assert_eq!(l.max_streams, 64);
        assert_eq!(l.connection_max_streams, 2);
        assert_eq!(l.max_request_bytes, 16 * 1024);
        assert_eq!(l.max_header_bytes, 8192);
        assert_eq!(l.first_request_timeout, Duration::from_millis(1500));
        assert_eq!(l.handshake_timeout, Duration::from_secs(2));
        assert_eq!(l.connection_new_jwt_interval, Duration::ZERO);
        assert_eq!((l.peer, l.peer_max_streams), (PeerMode::Pid, 3));
        // The buffer must hold at least one whole request.
        let e = limits(&[("SDS_MAX_BUFFERED_REQUEST_BYTES", "64KiB")]).unwrap_err();
        assert_eq!(e.var, "SDS_MAX_BUFFERED_REQUEST_BYTES");
        assert!(
            e.to_string().contains("SDS_MAX_REQUEST_BYTES (256KiB)"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, bad) in [
            ("SDS_MAX_CONNECTIONS", "0"),
            ("SDS_MAX_STREAMS", "many"),
            ("SDS_CONNECTION_MAX_STREAMS", "-1"),
            ("SDS_FIRST_REQUEST_TIMEOUT", "1ms"),
            ("SDS_KEEPALIVE_INTERVAL", "soon"),
            ("SDS_KEEPALIVE_TIMEOUT", "2h"),
            ("SDS_MAX_REQUEST_BYTES", "100"),
            ("SDS_MAX_REQUEST_BYTES", "1GiB"),
            ("SDS_MAX_REQUEST_BYTES", "64 parsecs"),
            ("SDS_MAX_HEADER_BYTES", "99999999999999999999"),
            ("SDS_MAX_BUFFERED_REQUEST_BYTES", "2GiB"),
            ("SDS_MAX_RESOURCE_NAMES", "0"),
            ("SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT", "0"),
            ("SDS_CONNECTION_NEW_JWT_BURST", "0"),
            ("SDS_CONNECTION_NEW_JWT_INTERVAL", "3d"),
            ("SDS_PEER", "pod"),
            ("SDS_PEER_MAX_CONNECTIONS", "0"),
            ("SDS_PEER_MAX_STREAMS", "lots"),
            ("SDS_PEER_MAX_LOGINS_IN_FLIGHT", "2000000"),
            ("SDS_PEER_NEW_JWT_BURST", "0"),
            ("SDS_PEER_NEW_JWT_INTERVAL", "25h"),
            ("SDS_PEER_MAX_IDENTITIES", "0"),
        ] {
            let e = limits(&[(var, bad)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}

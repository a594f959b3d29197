//! `STATUS_DEBUG_FROM`: the clients the status server shows what it knows
//! of each workload, `/debug/identities` and the metric series labelled with
//! an identity. Others get 403 for the page and only the node-wide metrics,
//! which are enough for alerts.
//!
//! The value is a comma-separated list of `loopback` (127.0.0.0/8 and ::1,
//! that is the agent's own network namespace), `any`, and networks in CIDR
//! form (`10.0.0.0/8`, `fd00::/8`) or single addresses. The default is
//! `loopback`: the port is reachable from the cluster network, and the page
//! lists every workload of the node, where istio-agent's shows only its own
//! pod.

use std::fmt;
use std::net::IpAddr;

use super::ConfigError;

/// Who is shown the per-workload pages; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugFrom(Vec<Source>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Loopback,
    Any,
    /// A network: its address and prefix length.
    Net(IpAddr, u8),
}

impl Default for DebugFrom {
    fn default() -> Self {
        Self(vec![Source::Loopback])
    }
}

impl DebugFrom {
    /// Everyone, as `STATUS_DEBUG_FROM=any`.
    pub fn any() -> Self {
        Self(vec![Source::Any])
    }

    /// Whether a client at `ip` is shown the per-workload pages. An
    /// IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4
    /// client) counts as the IPv4 address.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|s| match *s {
            Source::Loopback => ip.is_loopback(),
            Source::Any => true,
            Source::Net(net, bits) => in_network(ip, net, bits),
        })
    }

    /// Reads `STATUS_DEBUG_FROM` through `lookup`; unset or empty is `loopback`.
    pub(super) fn from_lookup(
        lookup: &impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        match lookup("STATUS_DEBUG_FROM").filter(|v| !v.trim().is_empty()) {
            None => Ok(Self::default()),
            Some(v) => Self::parse(&v).ok_or_else(|| {
                ConfigError::new(
                    "STATUS_DEBUG_FROM",
                    v,
                    "must be a comma-separated list of loopback, any, and networks such as 10.0.0.0/8 or fd00::/8 (or single addresses)",
                )
            }),
        }
    }

    fn parse(v: &str) -> Option<Self> {
        v.split(',')
            .map(|item| source(item.trim()))
            .collect::<Option<Vec<_>>>()
            .map(Self)
    }
}

fn source(item: &str) -> Option<Source> {
    if item.eq_ignore_ascii_case("loopback") {
        return Some(Source::Loopback);
    }
    if item.eq_ignore_ascii_case("any") {
        return Some(Source::Any);
    }
    let (addr, bits) = match item.split_once('/') {
        Some((addr, bits)) => (addr.parse::<IpAddr>().ok()?, Some(bits.parse::<u8>().ok()?)),
        None => (item.parse::<IpAddr>().ok()?, None),
    };
    let most = if addr.is_ipv4() { 32 } else { 128 };
    let bits = bits.unwrap_or(most);
    (bits <= most).then_some(Source::Net(addr, bits))
}

/// Whether the first `bits` bits of `ip` and `net` are equal.
fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let differ = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => u128::from(u32::from(a) ^ u32::from(n)) << 96,
        (IpAddr::V6(a), IpAddr::V6(n)) => u128::from(a) ^ u128::from(n),
        _ => return false,
    };
    // A shift by 128 (a /0 network) leaves nothing to compare.
    differ.checked_shr(128 - u32::from(bits)).unwrap_or(0) == 0
}

impl fmt::Display for DebugFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match s {
                Source::Loopback => f.write_str("loopback")?,
                Source::Any => f.write_str("any")?,
                Source::Net(addr, bits) => write!(f, "{addr}/{bits}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(v: &str) -> Result<DebugFrom, ConfigError> {
        DebugFrom::from_lookup(&|k: &str| (k == "STATUS_DEBUG_FROM").then(|| v.to_string()))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_by_default() {
        let d = DebugFrom::from_lookup(&|_: &str| None).unwrap();
        assert_eq!(d, DebugFrom::default());
        assert_eq!(from(" ").unwrap(), DebugFrom::default(), "empty is unset");
        assert_eq!(d.to_string(), "loopback");
        for yes in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(d.allows(ip(yes)), "{yes}");
        }
        for no in [
            "10.1.2.3",
            "192.0.2.2",
            "fd00::2",
            "::ffff:10.1.2.3",
            "0.0.0.0",
        ] {
            assert!(!d.allows(ip(no)), "{no}");
        }
    }

    #[test]
    fn any_and_networks() {
        assert!(from("ANY").unwrap().allows(ip("203.0.113.9")));
        assert!(DebugFrom::any().allows(ip("fd00::2")));

        let d = from("loopback, 10.0.0.0/8,fd00::/16 ,192.0.2.7").unwrap();
        assert_eq!(d.to_string(), "loopback,10.0.0.0/8,fd00::/16,192.0.2.7/32");
        for yes in [
            "127.0.0.1",
            "10.255.0.1",
            "::ffff:10.0.0.1",
            "fd00:1::5",
            "192.0.2.7",
        ] {
            assert!(d.allows(ip(yes)), "{yes}");
        }
        for no in ["11.0.0.1", "fd01::1", "192.0.2.8", "::ffff:11.0.0.1"] {
            assert!(!d.allows(ip(no)), "{no}");
        }
        let everyone = from("0.0.0.0/0").unwrap();
        assert!(everyone.allows(ip("198.51.100.1")));
        assert!(
            !everyone.allows(ip("fd00::1")),
            "an IPv4 network holds no IPv6 address"
        );
        assert!(
            from("10.1.2.3/8").unwrap().allows(ip("10.9.9.9")),
            "host bits are ignored"
        );
    }

    #[test]
    fn refusals_name_the_setting() {
        for bad in [
            "nobody",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "loopback,",
            "10.0.0.0/x",
        ] {
            let e = from(bad).unwrap_err();
            assert_eq!((e.var, e.value.as_str()), ("STATUS_DEBUG_FROM", bad));
        }
    }
}

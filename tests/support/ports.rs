//! Loopback ports for the servers tests start (Envoy listeners, OpenBao,
//! proxies), which must be named before the server binds them.
//!
//! Taken below the kernel's ephemeral range (32768–60999), so that no
//! outgoing connection can grab one between the pick and the bind, and never
//! handed out twice in one test process, so that tests running in parallel
//! cannot pick the same one.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

const RANGE: std::ops::Range<u16> = 20000..32000;

/// `count` consecutive free ports, first one returned.
fn take(count: u16) -> u16 {
    let mut handed = HANDED_OUT.lock().unwrap();
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..2000 {
        let first = RANGE.start + rand::random::<u16>() % (RANGE.end - RANGE.start - count);
        let ports: Vec<u16> = (first..first + count).collect();
        if ports.iter().any(|p| handed.contains(p)) {
            continue;
        }
        if ports
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            handed.extend(ports);
            return first;
        }
    }
    panic!("no free loopback port in {RANGE:?}");
}

/// A free loopback port.
pub fn free_port() -> u16 {
    take(1)
}

/// A port P with P+1 free too (OpenBao's dev mode listens on both).
pub fn free_port_pair() -> u16 {
    take(2)
}

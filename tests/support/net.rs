//! This machine's own addresses, for tests that must reach a server the way
//! a client on the network would, not over loopback.

use std::net::Ipv4Addr;

/// An IPv4 address of this machine other than loopback (eth0's, say): a
/// connection to it arrives from it, as one from the network would.
pub fn non_loopback_ipv4() -> Ipv4Addr {
    let mut found = None;
    // SAFETY: getifaddrs fills a list that freeifaddrs frees; each entry's
    // address is read only when it is an AF_INET sockaddr_in.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        assert_eq!(libc::getifaddrs(&mut list), 0, "getifaddrs");
        let mut at = list;
        while let Some(entry) = at.as_ref() {
            let up = entry.ifa_flags & libc::IFF_UP as u32 != 0;
            if up
                && !entry.ifa_addr.is_null()
                && i32::from((*entry.ifa_addr).sa_family) == libc::AF_INET
            {
                let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && found.is_none() {
                    found = Some(ip);
                }
            }
            at = entry.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found.expect(
        "this test needs an IPv4 address other than loopback on this machine (e.g. on eth0)",
    )
}

//! The connections still sending their first request head, which hold no
//! place yet. They are capped (`STATUS_MAX_PENDING_CONNECTIONS`), and a new
//! connection is always admitted: at the cap, one pending connection is
//! closed for it, the oldest of the peer address with the most pending. So
//! connections that send nothing, or send slowly, never keep a new one out,
//! and a peer that floods the port displaces its own connections before
//! another peer's, such as kubelet's probe from the node's address. What
//! this does not do: protect a client from a flood from its own address,
//! or from as many addresses as the cap, arriving faster than the agent
//! reads first bytes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The pending connections; see the module doc.
pub(super) struct PendingSet {
    cap: usize,
    inner: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    next: u64,
    /// Every pending connection by admission order: its peer, and the
    /// sender whose drop tells it to close.
    by_age: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    /// Each peer's pending connections, oldest first.
    by_peer: HashMap<IpAddr, VecDeque<u64>>,
}

/// A connection's membership of the [`PendingSet`]; it leaves when dropped.
pub(super) struct Pending {
    id: u64,
    displaced: oneshot::Receiver<()>,
    set: Arc<PendingSet>,
}

impl PendingSet {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            inner: Mutex::default(),
        })
    }

    /// Admits a new connection from `peer`; at the cap, one pending
    /// connection is told to close first, and its peer returned.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> (Pending, Option<IpAddr>) {
        let peer = peer.to_canonical();
        let (tx, rx) = oneshot::channel();
        let mut w = self.lock();
        let displaced = if w.by_age.len() >= self.cap {
            w.displace()
        } else {
            None
        };
        let id = w.next;
        w.next += 1;
        w.by_age.insert(id, (peer, tx));
        w.by_peer.entry(peer).or_default().push_back(id);
        let pending = Pending {
            id,
            displaced: rx,
            set: self.clone(),
        };
        (pending, displaced)
    }

    /// How many are pending now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().by_age.len()
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Waiting {
    /// Closes the oldest connection of the peer with the most pending (of
    /// those, the one whose oldest is oldest).
    fn displace(&mut self) -> Option<IpAddr> {
        let (&peer, _) = self
            .by_peer
            .iter()
            .max_by_key(|(_, ids)| (ids.len(), Reverse(ids.front().copied())))?;
        let id = self.by_peer.get(&peer)?.front().copied()?;
        self.remove(id);
        Some(peer)
    }

    fn remove(&mut self, id: u64) {
        let Some((peer, _closes)) = self.by_age.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_peer.get_mut(&peer) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }
}

impl Pending {
    /// Resolves once a newer connection has displaced this one.
    pub async fn displaced(&mut self) {
        let _ = (&mut self.displaced).await;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.set.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    async fn is_displaced(p: &mut Pending) -> bool {
        tokio::time::timeout(Duration::from_millis(100), p.displaced())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn the_oldest_of_the_peer_with_the_most_is_displaced() {
        let set = PendingSet::new(4);
        let (mut kubelet, _) = set.admit(ip("10.0.0.1"));
        let (mut a1, _) = set.admit(ip("10.0.0.9"));
        let (mut a2, _) = set.admit(ip("10.0.0.9"));
        let (a3, out) = set.admit(ip("::ffff:10.0.0.9"));
        assert_eq!(out, None, "room for four");
        let (_a4, out) = set.admit(ip("10.0.0.9"));
        assert_eq!(out, Some(ip("10.0.0.9")));
        assert!(is_displaced(&mut a1).await, "the flooding peer's oldest");
        assert!(!is_displaced(&mut kubelet).await, "though older");
        let (_a5, _) = set.admit(ip("10.0.0.9"));
        assert!(is_displaced(&mut a2).await);
        assert_eq!(set.len(), 4);

        // Peers with as many pending: the oldest connection goes.
        drop(a3);
        let (_b, out) = set.admit(ip("10.0.0.2"));
        assert_eq!(out, None);
        assert_eq!(set.len(), 4);
        let fair = PendingSet::new(2);
        let (mut x, _) = fair.admit(ip("10.0.0.3"));
        let (mut y, _) = fair.admit(ip("10.0.0.4"));
        let (_z, out) = fair.admit(ip("10.0.0.5"));
        assert_eq!(out, Some(ip("10.0.0.3")));
        assert!(is_displaced(&mut x).await);
        assert!(!is_displaced(&mut y).await);
    }

    #[tokio::test]
    async fn a_connection_leaves_when_its_head_is_read() {
        let set = PendingSet::new(2);
        let (a, _) = set.admit(ip("10.0.0.1"));
        let (_b, _) = set.admit(ip("10.0.0.1"));
        drop(a);
        assert_eq!(set.len(), 1);
        let (_c, out) = set.admit(ip("10.0.0.1"));
        assert_eq!(out, None, "room again");
    }
}

//! The peers of the agent's sockets and what each holds of the node-wide
//! places, so that no one peer (a pod, by default; see [`super::peer`])
//! takes more than its share: connections (`SDS_PEER_MAX_CONNECTIONS`),
//! streams (`SDS_PEER_MAX_STREAMS`), logins in flight and new JWTs
//! (`SDS_PEER_MAX_LOGINS_IN_FLIGHT`, `SDS_PEER_NEW_JWT_*`; see
//! [`super::logins`]) and identities added to the cache
//! (`SDS_PEER_MAX_IDENTITIES`).
//!
//! A peer's entry outlives its connections, so that reconnecting refills
//! nothing. Entries are forgotten only when the registry is full, which it
//! is at twice `SDS_MAX_CONNECTIONS` entries: first those idle for over
//! [`PEER_RETENTION`], else the idle one that left longest ago. Peers with a connection open are never forgotten, and there
//! are at most `SDS_MAX_CONNECTIONS` of them, so the registry never refuses.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::logins::{Budget, Identity, Known, PEER};
use super::peer::{attribute, Cred, PeerKey};
use crate::config::SdsLimits;
use crate::secrets::SecretError;

/// Peers idle this long are the first forgotten when the registry is full.
pub const PEER_RETENTION: Duration = Duration::from_secs(600);

/// What one peer holds of the node-wide places.
#[derive(Debug)]
pub struct Peer {
    pub key: PeerKey,
    connections: AtomicUsize,
    pub(crate) streams: AtomicUsize,
    max_streams: usize,
    pub(crate) logins: Budget,
    pub(crate) known: Known,
    /// Identities its first fetches added to the cache.
    identities: Mutex<HashSet<String>>,
    max_identities: usize,
    /// When its last connection closed (while it has none).
    left: Mutex<Option<Instant>>,
}

impl Peer {
    pub fn new(key: PeerKey, cfg: &SdsLimits) -> Arc<Self> {
        Arc::new(Self {
            key,
            connections: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            max_streams: cfg.peer_max_streams,
            logins: Budget::new(
                &PEER,
                cfg.peer_max_logins_in_flight,
                cfg.peer_new_jwt_burst,
                cfg.peer_new_jwt_interval,
            ),
            known: Known::default(),
            identities: Mutex::new(HashSet::new()),
            max_identities: cfg.peer_max_identities,
            left: Mutex::new(Some(Instant::now())),
        })
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Counts a stream of the peer; the refusal's message names
    /// `SDS_PEER_MAX_STREAMS`.
    pub(crate) fn open_stream(&self) -> Result<(), String> {
        let max = self.max_streams;
        if self.streams.fetch_add(1, Ordering::SeqCst) >= max {
            self.streams.fetch_sub(1, Ordering::SeqCst);
            return Err(format!(
                "too many streams of one peer ({}): SDS_PEER_MAX_STREAMS={max} are open; \
                 close one or raise SDS_PEER_MAX_STREAMS",
                self.key
            ));
        }
        Ok(())
    }

    /// The identity a fetch would add to the cache on the peer's behalf;
    /// refused past `SDS_PEER_MAX_IDENTITIES` before the CA is asked.
    pub(crate) fn new_identity(&self, identity: Identity) -> Result<Option<String>, SecretError> {
        let Identity::New(name) = identity else {
            return Ok(None);
        };
        let mine = self.identities.lock().expect("peer identities lock");
        if mine.contains(&name) {
            return Ok(None);
        }
        if mine.len() >= self.max_identities {
            return Err(SecretError::LimitReached {
                setting: "SDS_PEER_MAX_IDENTITIES",
                message: format!(
                    "this peer ({}) already added {} identities to the cache \
                     (SDS_PEER_MAX_IDENTITIES={}); refusing a new one, {name}; the CA was not asked",
                    self.key,
                    mine.len(),
                    self.max_identities
                ),
            });
        }
        Ok(Some(name))
    }

    /// A fetch of the peer added `identity` to the cache. At most
    /// `SDS_PEER_MAX_IDENTITIES` are counted, plus those whose first fetch
    /// was in flight when the share was reached.
    pub(crate) fn added_identity(&self, identity: String) {
        self.identities
            .lock()
            .expect("peer identities lock")
            .insert(identity);
    }

    pub fn added_identities(&self) -> usize {
        self.identities.lock().expect("peer identities lock").len()
    }

    fn idle_since(&self) -> Option<Instant> {
        *self.left.lock().expect("peer lock")
    }
}

/// A connection's place among its peer's; given back when dropped.
#[derive(Debug)]
pub struct PeerPlace {
    peer: Arc<Peer>,
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut left = self.peer.left.lock().expect("peer lock");
        if self.peer.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            *left = Some(Instant::now());
        }
    }
}

/// The registry of peers, shared by every socket.
#[derive(Debug)]
pub struct Peers {
    cfg: SdsLimits,
    map: Mutex<HashMap<PeerKey, Arc<Peer>>>,
    max_entries: usize,
    proc: PathBuf,
    fallback_logged: AtomicBool,
}

impl Peers {
    pub fn new(cfg: &SdsLimits) -> Self {
        Self::with_proc(cfg, "/proc".into())
    }

    pub(crate) fn with_proc(cfg: &SdsLimits, proc: PathBuf) -> Self {
        Self {
            cfg: cfg.clone(),
            map: Mutex::new(HashMap::new()),
            max_entries: cfg.max_connections.saturating_mul(2),
            proc,
            fallback_logged: AtomicBool::new(false),
        }
    }

    /// The peer of a connection whose `SO_PEERCRED` said `cred`. A fallback
    /// (see [`super::peer`]) is logged once.
    pub fn attribute(&self, cred: Option<Cred>) -> PeerKey {
        match attribute(self.cfg.peer, cred, &self.proc) {
            Ok(key) => key,
            Err((key, why)) => {
                if !self.fallback_logged.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "SDS_PEER={}: {why}; such connections are attributed to {key} \
                         (logged once)",
                        self.cfg.peer
                    );
                }
                key
            }
        }
    }

    /// Counts a connection of `key`'s peer: its place, or (when the peer
    /// already holds `SDS_PEER_MAX_CONNECTIONS`) the peer and the refusal.
    pub fn connect(&self, key: PeerKey) -> Result<(Arc<Peer>, PeerPlace), (Arc<Peer>, String)> {
        let peer = self.peer(key);
        let max = self.cfg.peer_max_connections;
        let mut left = peer.left.lock().expect("peer lock");
        if peer.connections.fetch_add(1, Ordering::SeqCst) >= max {
            peer.connections.fetch_sub(1, Ordering::SeqCst);
            drop(left);
            let msg = format!(
                "too many connections of one peer ({}): SDS_PEER_MAX_CONNECTIONS={max} are open; \
                 close one or raise SDS_PEER_MAX_CONNECTIONS",
                peer.key
            );
            return Err((peer, msg));
        }
        *left = None;
        drop(left);
        Ok((peer.clone(), PeerPlace { peer }))
    }

    /// The entry of `key`, made if there is none (forgetting idle peers
    /// when the registry is full).
    fn peer(&self, key: PeerKey) -> Arc<Peer> {
        let mut map = self.map.lock().expect("peers lock");
        if let Some(peer) = map.get(&key) {
            return peer.clone();
        }
        if map.len() >= self.max_entries {
            let now = Instant::now();
            map.retain(|_, p| p.idle_since().is_none_or(|t| now - t < PEER_RETENTION));
            if map.len() >= self.max_entries {
                let oldest = map
                    .iter()
                    .filter_map(|(k, p)| p.idle_since().map(|t| (t, k.clone())))
                    .min_by_key(|(t, _)| *t);
                if let Some((_, k)) = oldest {
                    map.remove(&k);
                }
            }
        }
        let peer = Peer::new(key.clone(), &self.cfg);
        map.insert(key, peer.clone());
        peer
    }

    /// Peers remembered.
    pub fn len(&self) -> usize {
        self.map.lock().expect("peers lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_connections: usize, peer_max_connections: usize) -> SdsLimits {
        SdsLimits {
            max_connections,
            peer_max_connections,
            ..SdsLimits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peers_connections_are_capped_and_given_back() {
        let peers = Peers::new(&cfg(100, 2));
        let a = peers.connect(PeerKey::Pid(1, 0)).unwrap();
        let _b = peers.connect(PeerKey::Pid(1, 0)).unwrap();
        let (peer, msg) = peers.connect(PeerKey::Pid(1, 0)).unwrap_err();
        assert!(msg.contains("SDS_PEER_MAX_CONNECTIONS=2"), "{msg}");
        assert!(msg.contains("pid 1"), "{msg}");
        assert_eq!(peer.open_connections(), 2);
        // Another peer is not affected.
        let _c = peers.connect(PeerKey::Pid(2, 0)).unwrap();
        drop(a);
        assert!(peers.connect(PeerKey::Pid(1, 0)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_peers_streams_are_capped() {
        let peer = Peer::new(
            PeerKey::Uid(1),
            &SdsLimits {
                peer_max_streams: 2,
                ..SdsLimits::default()
            },
        );
        peer.open_stream().unwrap();
        peer.open_stream().unwrap();
        let msg = peer.open_stream().unwrap_err();
        assert!(msg.contains("SDS_PEER_MAX_STREAMS=2"), "{msg}");
        assert_eq!(peer.open_streams(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_past_the_peers_share_is_refused_on_any_of_its_connections() {
        use crate::endpoint::connection::Connection;
        use crate::endpoint::limits::Limits;
        let limits = Limits::new(SdsLimits {
            peer_max_streams: 3,
            peer_max_connections: 2,
            ..SdsLimits::default()
        });
        let cfg = limits.config().clone();
        let conn = |id| {
            let (peer, place) = limits.peers.connect(PeerKey::Pid(1, 0)).unwrap();
            (Arc::new(Connection::of_peer(id, &cfg, peer, None)), place)
        };
        let ((a, _pa), (b, _pb)) = (conn(1), conn(2));
        let a1 = limits.open_stream(&a).unwrap();
        let _a2 = limits.open_stream(&a).unwrap();
        let _b1 = limits.open_stream(&b).unwrap();
        let e = limits.open_stream(&b).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("SDS_PEER_MAX_STREAMS=3"), "{e:?}");
        assert_eq!((limits.open_streams(), b.open_streams()), (3, 1));
        drop(a1);
        let _b2 = limits.open_stream(&b).unwrap();
        // A connection past the peer's share is refused its every stream,
        // with the setting named.
        let (peer, msg) = limits.peers.connect(PeerKey::Pid(1, 0)).unwrap_err();
        let c = Arc::new(Connection::of_peer(3, &cfg, peer, Some(msg)));
        let e = limits.open_stream(&c).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("SDS_PEER_MAX_CONNECTIONS=2"), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_peers_are_remembered_then_forgotten_and_the_registry_is_bounded() {
        // Two connections at most: four entries.
        let peers = Peers::new(&cfg(2, 2));
        let (kept, _place) = peers.connect(PeerKey::Pid(1, 0)).unwrap();
        drop(peers.connect(PeerKey::Pid(2, 0)).unwrap());
        // An idle peer is the same entry when it comes back.
        let (again, _p2) = peers.connect(PeerKey::Pid(2, 0)).unwrap();
        assert_eq!(peers.len(), 2);
        drop(_p2);
        // Many peers come and go: the registry stays bounded, the idle
        // entry that left longest ago goes first, and a peer with a
        // connection open is never forgotten.
        for pid in 10..100 {
            tokio::time::advance(Duration::from_secs(1)).await;
            drop(peers.connect(PeerKey::Pid(pid, 0)).unwrap());
            assert!(peers.len() <= 4, "{}", peers.len());
        }
        let (same, _p) = peers.connect(PeerKey::Pid(1, 0)).unwrap();
        assert!(Arc::ptr_eq(&kept, &same));
        let (fresh, _p) = peers.connect(PeerKey::Pid(2, 0)).unwrap();
        assert!(!Arc::ptr_eq(&again, &fresh), "forgotten, made anew");
    }

    #[tokio::test(start_paused = true)]
    async fn the_fallback_is_the_uid() {
        let dir = tempfile::tempdir().unwrap();
        let peers = Peers::with_proc(&SdsLimits::default(), dir.path().into());
        let gone = Some(Cred {
            pid: Some(4242),
            uid: 7,
        });
        assert_eq!(peers.attribute(gone), PeerKey::Uid(7));
        assert!(peers.fallback_logged.load(Ordering::SeqCst));
        assert_eq!(peers.attribute(gone), PeerKey::Uid(7));
    }
}

//! The login budgets of a connection and of its peer, and when a JWT is
//! known (see [`super::super::logins`]).

use super::*;
use crate::endpoint::peers::Peers;

fn cred(n: u32) -> Credential {
    Credential::new(format!("jwt-{n}"))
}

/// The connection's budget as given; the peer's out of the way.
fn limits(burst: u32, interval_s: u64, in_flight: usize) -> SdsLimits {
    SdsLimits {
        connection_new_jwt_burst: burst,
        connection_new_jwt_interval: Duration::from_secs(interval_s),
        connection_max_logins_in_flight: in_flight,
        peer_new_jwt_burst: 1 << 20,
        peer_max_logins_in_flight: 1024,
        ..SdsLimits::default()
    }
}

/// The peer's budget as given; each connection's out of the way.
fn peer_limits(burst: u32, interval_s: u64, in_flight: usize) -> SdsLimits {
    SdsLimits {
        peer_new_jwt_burst: burst,
        peer_new_jwt_interval: Duration::from_secs(interval_s),
        peer_max_logins_in_flight: in_flight,
        connection_new_jwt_burst: 1 << 20,
        connection_max_logins_in_flight: 1024,
        ..SdsLimits::default()
    }
}

fn admit(c: &Connection, n: u32) -> Result<Admission, SecretError> {
    c.admit(&cred(n), Identity::Cached)
}

fn setting(r: Result<Admission, SecretError>) -> &'static str {
    match r {
        Err(SecretError::LimitReached { setting, .. }) => setting,
        other => panic!("expected a limit, got {other:?}"),
    }
}

fn message(r: Result<Admission, SecretError>) -> String {
    match r {
        Err(e @ SecretError::LimitReached { .. }) => e.to_string(),
        other => panic!("expected a limit, got {other:?}"),
    }
}

/// A connection of the peer `key` of `peers`.
fn connect(peers: &Peers, cfg: &SdsLimits, id: u64, key: PeerKey) -> (Connection, PeerPlace) {
    let (peer, place) = peers.connect(key).expect("under the peer's connections");
    (Connection::of_peer(id, cfg, peer, None), place)
}

#[tokio::test(start_paused = true)]
async fn new_jwts_spend_the_bucket_known_ones_do_not() {
    let c = Connection::new(1, &limits(3, 10, 100));
    let mut held = Vec::new();
    for n in 0..3 {
        held.push(admit(&c, n).unwrap());
    }
    assert_eq!(setting(admit(&c, 3)), "SDS_CONNECTION_NEW_JWT_BURST");
    // Once the CA has proven it, a JWT costs nothing, however often.
    c.proven(held.remove(1));
    for _ in 0..100 {
        assert!(admit(&c, 1).unwrap().is_known());
    }
    // One token per interval, not before.
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(admit(&c, 3).is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(admit(&c, 3).unwrap().is_new());
    assert!(admit(&c, 4).is_err());
    // A long pause refills up to the burst, no further.
    tokio::time::advance(Duration::from_secs(3600)).await;
    for n in 10..13 {
        assert!(admit(&c, n).unwrap().is_new());
    }
    assert!(admit(&c, 13).is_err());
}

#[tokio::test(start_paused = true)]
async fn logins_in_flight_are_bounded_and_freed() {
    let c = Connection::new(1, &limits(100, 1, 2));
    let a = admit(&c, 0).unwrap();
    let _b = admit(&c, 1).unwrap();
    assert_eq!(setting(admit(&c, 2)), "SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT");
    // A JWT already being logged in with is not a second login.
    assert!(admit(&c, 0).unwrap().is_in_flight());
    drop(a);
    assert!(admit(&c, 2).unwrap().is_new());
}

#[tokio::test(start_paused = true)]
async fn the_rate_can_be_turned_off_and_fingerprints_are_bounded() {
    let c = Connection::new(1, &limits(1, 0, 1000));
    for n in 0..200 {
        let a = admit(&c, n).unwrap();
        c.proven(a);
    }
    assert_eq!(
        c.peer.known.proven_len(),
        crate::endpoint::logins::KNOWN_JWTS
    );
}

#[tokio::test(start_paused = true)]
async fn a_jwt_is_known_only_once_the_ca_proved_it() {
    let c = Connection::new(1, &limits(3, 10, 100));
    // A repeat while its login is in flight is coalesced: no token spent.
    let first = admit(&c, 0).unwrap();
    assert!(first.is_new());
    let repeats: Vec<_> = (0..10).map(|_| admit(&c, 0).unwrap()).collect();
    assert!(repeats.iter().all(Admission::is_in_flight));
    // The CA rejected it: it never became known, so each repeat after the
    // login ended spends a token again, until the budget is gone.
    drop((first, repeats));
    for _ in 0..2 {
        let again = admit(&c, 0).unwrap();
        assert!(again.is_new(), "{again:?}");
    }
    assert_eq!(setting(admit(&c, 0)), "SDS_CONNECTION_NEW_JWT_BURST");
    // One the CA proved costs nothing from then on, even with the budget
    // spent.
    tokio::time::advance(Duration::from_secs(10)).await;
    let good = admit(&c, 1).unwrap();
    c.proven(good);
    for _ in 0..10 {
        assert!(admit(&c, 1).unwrap().is_known());
    }
    assert!(admit(&c, 2).is_err());
}

#[tokio::test(start_paused = true)]
async fn the_peers_budget_survives_reconnects() {
    let cfg = SdsLimits {
        peer: crate::config::PeerMode::Pid,
        ..peer_limits(3, 10, 100)
    };
    let peers = Peers::new(&cfg);
    let mut n = 0;
    // Each connection is new and has a fresh budget of its own; the peer's
    // is spent over all of them.
    for id in 0..3 {
        let (c, _place) = connect(&peers, &cfg, id, PeerKey::Pid(7, 0));
        assert!(admit(&c, n).unwrap().is_new());
        n += 1;
    }
    for id in 3..6 {
        let (c, _place) = connect(&peers, &cfg, id, PeerKey::Pid(7, 0));
        let m = message(admit(&c, n));
        assert!(m.contains("SDS_PEER_NEW_JWT_BURST=3"), "{m}");
        assert!(m.contains("SDS_PEER_NEW_JWT_INTERVAL=10s"), "{m}");
    }
    // Another peer is not affected.
    let (other, _place) = connect(&peers, &cfg, 9, PeerKey::Pid(8, 0));
    assert!(admit(&other, 100).unwrap().is_new());
    // The peer's rate applies across reconnects: one token per interval.
    tokio::time::advance(Duration::from_secs(10)).await;
    let (c, _place) = connect(&peers, &cfg, 10, PeerKey::Pid(7, 0));
    assert!(admit(&c, n).unwrap().is_new());
    assert_eq!(setting(admit(&c, n + 1)), "SDS_PEER_NEW_JWT_BURST");
}

#[tokio::test(start_paused = true)]
async fn the_peers_logins_in_flight_are_bounded_over_its_connections() {
    let cfg = peer_limits(100, 1, 2);
    let peers = Peers::new(&cfg);
    let (a, _pa) = connect(&peers, &cfg, 1, PeerKey::Uid(1));
    let (b, _pb) = connect(&peers, &cfg, 2, PeerKey::Uid(1));
    let held = admit(&a, 0).unwrap();
    let _held2 = admit(&b, 1).unwrap();
    let m = message(admit(&b, 2));
    assert!(m.contains("SDS_PEER_MAX_LOGINS_IN_FLIGHT=2"), "{m}");
    // Coalesced with the login in flight, on another connection of the peer.
    assert!(admit(&b, 0).unwrap().is_in_flight());
    drop(held);
    assert!(admit(&b, 2).unwrap().is_new());
}

#[tokio::test(start_paused = true)]
async fn identities_a_peer_adds_to_the_cache_are_bounded() {
    let cfg = SdsLimits {
        peer_max_identities: 2,
        ..peer_limits(100, 1, 100)
    };
    let peers = Peers::new(&cfg);
    let (c, pc) = connect(&peers, &cfg, 1, PeerKey::Uid(1));
    let new = |name: &str| Identity::New(name.to_string());
    for (n, name) in [(0, "a"), (1, "b")] {
        let a = c.admit(&cred(n), new(name)).unwrap();
        c.proven(a);
    }
    assert_eq!(c.peer.added_identities(), 2);
    let m = message(c.admit(&cred(2), new("c")));
    assert!(m.contains("SDS_PEER_MAX_IDENTITIES=2"), "{m}");
    // An identity it added before, or one cached already, adds nothing.
    assert!(c.admit(&cred(3), new("a")).is_ok());
    assert!(c.admit(&cred(4), Identity::Cached).is_ok());
    // A first fetch the CA refused counted nothing.
    let (d, _pd) = connect(&peers, &cfg, 2, PeerKey::Uid(2));
    drop(d.admit(&cred(5), new("x")).unwrap());
    assert_eq!(d.peer.added_identities(), 0);
    // Reconnecting refills nothing.
    drop((c, pc));
    let (e, _pe) = connect(&peers, &cfg, 3, PeerKey::Uid(1));
    assert_eq!(
        setting(e.admit(&cred(6), new("c"))),
        "SDS_PEER_MAX_IDENTITIES"
    );
}

#[tokio::test(start_paused = true)]
async fn the_defaults_leave_a_normal_pod_alone() {
    use crate::endpoint::limits::Limits;
    let limits = Limits::new(SdsLimits::default());
    let cfg = limits.config().clone();
    let mut id = 0;
    // A day of one pod: its Envoy's two connections, two streams each,
    // reconnecting every 8 minutes (and ten times at once when it
    // restarts), its token rotated every 48 minutes and presented on every
    // stream; the first fetch adds its identity.
    for rotation in 0..30u32 {
        for reconnect in 0..6 {
            let times = if reconnect == 0 { 10 } else { 1 };
            for _ in 0..times {
                let (mut held, mut conns) = (Vec::new(), Vec::new());
                for _ in 0..2 {
                    id += 1;
                    let (peer, place) = limits.peers.connect(PeerKey::Pid(1, 0)).unwrap();
                    let conn = Arc::new(Connection::of_peer(id, &cfg, peer, None));
                    for _ in 0..2 {
                        let slot = limits.open_stream(&conn).unwrap();
                        // The connection's and the peer's streams, at most.
                        assert!(conn.peer.open_streams() <= 4);
                        let identity = match rotation {
                            0 => Identity::New("spiffe://cluster.local/ns/a/sa/b".into()),
                            _ => Identity::Cached,
                        };
                        let admission = conn.admit(&cred(rotation), identity).unwrap();
                        conn.proven(admission);
                        held.push(slot);
                    }
                    conns.push((place, conn));
                }
            }
            tokio::time::advance(Duration::from_secs(8 * 60)).await;
        }
    }
}

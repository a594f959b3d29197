//! One accepted connection on a socket of the agent, and what it keeps about
//! it: an id for the log, how many streams it has open, and the JWTs it has
//! presented, which decide how many Vault logins it may cause.
//!
//! Every pod that reaches the socket holds a JWT Vault accepts, and can mint
//! none that it does not; but nothing stops it from presenting thousands of
//! forged ones, each of which would cost a Vault login and a TokenReview. So
//! a JWT that is new to a connection spends a token of that connection's
//! bucket (`SDS_CONNECTION_NEW_JWT_BURST`, refilled one per
//! `SDS_CONNECTION_NEW_JWT_INTERVAL`), and at most
//! `SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT` of them may wait on the CA at once.
//! A JWT the connection presented before costs nothing: its login is cached
//! or coalesced by the CA client. An Envoy presents one JWT per connection,
//! and a new one when kubelet rotates its token.
//!
//! The state is reached from a request through tonic's connect info: the
//! accepted socket is wrapped in [`ConnIo`], whose [`Connected`] impl hands
//! an `Arc<Connection>` to every request of the connection.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::transport::server::Connected;

use super::caps::{CapPlace, Caps};
use super::credential::LastCredential;
use super::limits::Limits;
use super::unproven::Proof;
use crate::config::SdsLimits;
use crate::identity::Credential;
use crate::secrets::SecretError;

/// How many JWT fingerprints a connection remembers (32 bytes each). A JWT
/// forgotten this way costs a token again if presented again.
const KNOWN_JWTS: usize = 64;

/// What the agent keeps about one connection.
pub struct Connection {
    /// For the log: `connection=7`.
    pub id: u64,
    /// Streams open on this connection (see [`super::limits`]).
    pub(crate) streams: AtomicUsize,
    logins: LoginGate,
    /// The credential header its requests last carried (see [`LastCredential`]).
    pub(crate) last_credential: LastCredential,
    /// Whether a credential of it was proven (see [`super::unproven`]).
    pub(crate) proof: Arc<Proof>,
    /// It has opened a stream: its handshake is over.
    streamed: AtomicBool,
}

impl Connection {
    pub fn new(id: u64, limits: &SdsLimits) -> Self {
        Self {
            id,
            streams: AtomicUsize::new(0),
            logins: LoginGate::new(limits),
            last_credential: LastCredential::default(),
            proof: Proof::new(),
            streamed: AtomicBool::new(false),
        }
    }

    /// A stream of it was served: the CA accepted a credential it
    /// carried, so neither it nor that stream makes room for others.
    pub fn prove(&self) {
        self.proof.prove();
    }

    pub(crate) fn opened_a_stream(&self) {
        self.streamed.store(true, Ordering::SeqCst);
    }

    /// Lets `credential` go to the CA on behalf of this connection, or says
    /// which bound it would pass. Hold the returned admission until the
    /// fetch it allows has ended.
    pub fn admit(&self, credential: &Credential) -> Result<Admission, SecretError> {
        self.logins.admit(credential)
    }

    /// Streams open on this connection.
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("streams", &self.open_streams())
            .finish_non_exhaustive()
    }
}

/// Permission for one fetch to reach the CA with a credential.
#[derive(Debug)]
pub enum Admission {
    /// The connection presented this JWT before: its login is cached or
    /// being made.
    Known,
    /// A JWT new to the connection; the permit is its place among the logins
    /// in flight.
    New(#[allow(dead_code)] OwnedSemaphorePermit),
}

/// The login budget of one connection.
struct LoginGate {
    state: Mutex<GateState>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    burst: u32,
    interval: Duration,
}

struct GateState {
    bucket: TokenBucket,
    /// SHA-256 of the JWTs presented, oldest first.
    known: VecDeque<[u8; 32]>,
}

impl LoginGate {
    fn new(limits: &SdsLimits) -> Self {
        Self {
            state: Mutex::new(GateState {
                bucket: TokenBucket::new(
                    limits.connection_new_jwt_burst,
                    limits.connection_new_jwt_interval,
                ),
                known: VecDeque::new(),
            }),
            in_flight: Arc::new(Semaphore::new(limits.connection_max_logins_in_flight)),
            max_in_flight: limits.connection_max_logins_in_flight,
            burst: limits.connection_new_jwt_burst,
            interval: limits.connection_new_jwt_interval,
        }
    }

    fn admit(&self, credential: &Credential) -> Result<Admission, SecretError> {
        let key = credential.sha256();
        let mut state = self.state.lock().expect("login gate lock");
        if state.known.contains(&key) {
            return Ok(Admission::Known);
        }
        // In flight first: a refusal for that reason spends no token.
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(SecretError::LimitReached {
                setting: "SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT",
                message: format!(
                    "this connection already has {} logins with new JWTs waiting on the CA \
                     (SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT={}); the CA was not asked",
                    self.max_in_flight, self.max_in_flight
                ),
            });
        };
        if !state.bucket.try_take(Instant::now()) {
            return Err(SecretError::LimitReached {
                setting: "SDS_CONNECTION_NEW_JWT_BURST",
                message: format!(
                    "this connection presented too many different JWTs \
                     (SDS_CONNECTION_NEW_JWT_BURST={}, then one per SDS_CONNECTION_NEW_JWT_INTERVAL={:?}); \
                     the CA was not asked",
                    self.burst, self.interval
                ),
            });
        }
        if state.known.len() == KNOWN_JWTS {
            state.known.pop_front();
        }
        state.known.push_back(key);
        Ok(Admission::New(permit))
    }
}

/// A token bucket: `capacity` tokens, one more every `interval` (an
/// interval of zero means no rate limit).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: u32,
    capacity: u32,
    interval: Duration,
    /// When the next token is added (while below capacity).
    next: Instant,
}

impl TokenBucket {
    pub(crate) fn new(capacity: u32, interval: Duration) -> Self {
        Self {
            tokens: capacity,
            capacity,
            interval,
            next: Instant::now() + interval,
        }
    }

    /// Takes a token if there is one at `now`.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        if self.tokens < self.capacity && now >= self.next {
            let periods = (now - self.next).as_nanos() / self.interval.as_nanos() + 1;
            let add = periods.min(u128::from(self.capacity - self.tokens)) as u32;
            self.tokens += add;
            self.next += self.interval * add;
        }
        if self.tokens == 0 {
            return false;
        }
        if self.tokens == self.capacity {
            // Refill starts counting when the bucket stops being full.
            self.next = now + self.interval;
        }
        self.tokens -= 1;
        true
    }
}

/// An accepted connection: the socket plus its state, which reaches every
/// request through tonic's connect info. Dropped when hyper is done with the
/// connection, which frees its place under `SDS_MAX_CONNECTIONS` and under
/// its socket's own caps.
pub struct ConnIo {
    io: UnixStream,
    conn: Arc<Connection>,
    limits: Arc<Limits>,
    _place: Option<CapPlace>,
    /// Until the connection opens its first stream: when it must have
    /// (`SDS_HANDSHAKE_TIMEOUT`).
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ConnIo {
    /// Whether the connection must close now: evicted to make room, or no
    /// stream within `SDS_HANDSHAKE_TIMEOUT`.
    fn must_close(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.conn.proof.poll_evicted(cx) {
            tracing::debug!(
                connection = self.conn.id,
                "evicted: it had proven no credential"
            );
            return Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "evicted to make room at SDS_MAX_CONNECTIONS",
            ));
        }
        if let Some(deadline) = self.handshake.as_mut() {
            if self.conn.streamed.load(Ordering::SeqCst) {
                self.handshake = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                let timeout = self.limits.config().handshake_timeout;
                self.limits.warn(
                    "SDS_HANDSHAKE_TIMEOUT",
                    format!(
                        "connection {}: no stream opened within SDS_HANDSHAKE_TIMEOUT={timeout:?} of \
                         connecting (no HTTP/2 preface, or nothing asked); closing it",
                        self.conn.id
                    ),
                );
                crate::metrics::refused(crate::metrics::Refusal::Limits);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no stream within SDS_HANDSHAKE_TIMEOUT",
                ));
            }
        }
        None
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        self.limits.connection_closed();
        tracing::debug!(connection = self.conn.id, "connection closed");
    }
}

/// The connect info of a [`ConnIo`].
#[derive(Clone, Debug)]
pub struct ConnInfo(pub Arc<Connection>);

impl Connected for ConnIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo(self.conn.clone())
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.must_close(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The connections accepted on `listener`, each with its state. At
/// `SDS_MAX_CONNECTIONS` the oldest connection that has proven no credential
/// is evicted to make room; when none has, or past the socket's own `caps`,
/// a new one is closed at once (its client sees the connection reset, gRPC
/// `UNAVAILABLE`), with one warning per interval.
pub fn incoming(
    listener: UnixListener,
    limits: Arc<Limits>,
    caps: Option<Arc<Caps>>,
) -> impl Stream<Item = Result<ConnIo, io::Error>> {
    let next_id = AtomicU64::new(1);
    futures::stream::unfold(
        (listener, limits, caps, next_id),
        |(listener, limits, caps, next_id)| async move {
            loop {
                match listener.accept().await {
                    Ok((io, _)) => {
                        if !limits.connection_opened() {
                            drop(io);
                            continue;
                        }
                        let place = match &caps {
                            None => None,
                            Some(caps) => match caps.open_connection(&limits) {
                                Some(place) => Some(place),
                                None => {
                                    limits.connection_closed();
                                    drop(io);
                                    continue;
                                }
                            },
                        };
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(connection = id, "connection accepted");
                        let conn = Arc::new(Connection::new(id, limits.config()));
                        limits.unproven_connections.register(&conn.proof);
                        let io = ConnIo {
                            io,
                            conn,
                            limits: limits.clone(),
                            _place: place,
                            handshake: Some(Box::pin(tokio::time::sleep(
                                limits.config().handshake_timeout,
                            ))),
                        };
                        return Some((Ok(io), (listener, limits, caps, next_id)));
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: wait a little
                        // rather than spin on a listener that keeps failing.
                        limits.warn(
                            "accept",
                            format!("cannot accept a connection on a socket of the agent: {e}"),
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(n: u32) -> Credential {
        Credential::new(format!("jwt-{n}"))
    }

    fn limits(burst: u32, interval_s: u64, in_flight: usize) -> SdsLimits {
        SdsLimits {
            connection_new_jwt_burst: burst,
            connection_new_jwt_interval: Duration::from_secs(interval_s),
            connection_max_logins_in_flight: in_flight,
            ..SdsLimits::default()
        }
    }

    fn setting(r: Result<Admission, SecretError>) -> &'static str {
        match r {
            Err(SecretError::LimitReached { setting, .. }) => setting,
            other => panic!("expected a limit, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn new_jwts_spend_the_bucket_known_ones_do_not() {
        let c = Connection::new(1, &limits(3, 10, 100));
        let mut held = Vec::new();
        for n in 0..3 {
            held.push(c.admit(&cred(n)).unwrap());
        }
        assert_eq!(setting(c.admit(&cred(3))), "SDS_CONNECTION_NEW_JWT_BURST");
        // Known JWTs cost nothing, however often.
        for _ in 0..100 {
            assert!(matches!(c.admit(&cred(1)), Ok(Admission::Known)));
        }
        // One token per interval, not before.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(c.admit(&cred(3)).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(c.admit(&cred(3)), Ok(Admission::New(_))));
        assert!(c.admit(&cred(4)).is_err());
        // A long pause refills up to the burst, no further.
        tokio::time::advance(Duration::from_secs(3600)).await;
        for n in 10..13 {
            assert!(matches!(c.admit(&cred(n)), Ok(Admission::New(_))));
        }
        assert!(c.admit(&cred(13)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn logins_in_flight_are_bounded_and_freed() {
        let c = Connection::new(1, &limits(100, 1, 2));
        let a = c.admit(&cred(0)).unwrap();
        let _b = c.admit(&cred(1)).unwrap();
        assert_eq!(
            setting(c.admit(&cred(2))),
            "SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT"
        );
        // A JWT already being logged in with is not a second login.
        assert!(matches!(c.admit(&cred(0)), Ok(Admission::Known)));
        drop(a);
        assert!(matches!(c.admit(&cred(2)), Ok(Admission::New(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_can_be_turned_off_and_fingerprints_are_bounded() {
        let c = Connection::new(1, &limits(1, 0, 1000));
        let held: Vec<_> = (0..200).map(|n| c.admit(&cred(n)).unwrap()).collect();
        assert_eq!(c.logins.state.lock().unwrap().known.len(), KNOWN_JWTS);
        drop(held);
    }

    #[test]
    fn bucket_arithmetic() {
        let start = Instant::now();
        let mut b = TokenBucket::new(2, Duration::from_secs(5));
        assert!(b.try_take(start));
        assert!(b.try_take(start));
        assert!(!b.try_take(start + Duration::from_secs(4)));
        assert!(b.try_take(start + Duration::from_secs(5)));
        // Two periods later: two tokens (the burst), not three.
        assert!(b.try_take(start + Duration::from_secs(30)));
        assert!(b.try_take(start + Duration::from_secs(30)));
        assert!(!b.try_take(start + Duration::from_secs(30)));
    }
}

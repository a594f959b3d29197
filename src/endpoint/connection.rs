//! One accepted connection on a socket of the agent, and what it keeps about
//! it: an id for the log, its peer ([`super::peers`]), how many streams it
//! has open, and its login budget ([`super::logins`]).
//!
//! The state is reached from a request through tonic's connect info: the
//! accepted socket is wrapped in [`ConnIo`], whose [`Connected`] impl hands
//! an `Arc<Connection>` to every request of the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use super::caps::{CapPlace, Caps};
use super::credential::LastCredential;
use super::limits::Limits;
pub use super::logins::Admission;
use super::logins::{Budget, Identity, CONNECTION};
use super::peer::{Cred, PeerKey};
use super::peers::{Peer, PeerPlace};
use super::unproven::Proof;
use crate::config::SdsLimits;
use crate::identity::Credential;
use crate::secrets::SecretError;

/// What the agent keeps about one connection.
pub struct Connection {
    /// For the log: `connection=7`.
    pub id: u64,
    /// Whose connection it is.
    pub peer: Arc<Peer>,
    /// Why its streams are refused: its peer already held
    /// `SDS_PEER_MAX_CONNECTIONS` when it connected.
    pub(crate) refused: Option<String>,
    /// Streams open on this connection (see [`super::limits`]).
    pub(crate) streams: AtomicUsize,
    logins: Budget,
    /// The credential header its requests last carried (see [`LastCredential`]).
    pub(crate) last_credential: LastCredential,
    /// Whether a credential of it was proven (see [`super::unproven`]).
    pub(crate) proof: Arc<Proof>,
    /// It has opened a stream: its handshake is over.
    streamed: AtomicBool,
}

impl Connection {
    /// A connection that is a peer of its own.
    pub fn new(id: u64, limits: &SdsLimits) -> Self {
        Self::of_peer(id, limits, Peer::new(PeerKey::Unknown, limits), None)
    }

    /// A connection of `peer`; `refused` says why its streams are refused.
    pub fn of_peer(id: u64, limits: &SdsLimits, peer: Arc<Peer>, refused: Option<String>) -> Self {
        Self {
            id,
            peer,
            refused,
            streams: AtomicUsize::new(0),
            logins: Budget::new(
                &CONNECTION,
                limits.connection_max_logins_in_flight,
                limits.connection_new_jwt_burst,
                limits.connection_new_jwt_interval,
            ),
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

    /// Lets `credential` go to the CA on behalf of this connection and its
    /// peer, or says which bound it would pass (see [`super::logins`]);
    /// `identity` says whether its identity is cached. Hold the returned
    /// admission until the fetch it allows has ended.
    pub fn admit(
        &self,
        credential: &Credential,
        identity: Identity,
    ) -> Result<Admission, SecretError> {
        super::logins::admit(&self.logins, &self.peer, credential, identity)
    }

    /// The fetch `admission` allowed succeeded: the CA proved its JWT, which
    /// is known to the peer from now on, and the identity it added to the
    /// cache counts against the peer's share.
    pub fn proven(&self, admission: Admission) {
        self.peer.known.prove(admission.key);
        if let Some(identity) = admission.new_identity {
            self.peer.added_identity(identity);
        }
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
            .field("peer", &self.peer.key)
            .field("streams", &self.open_streams())
            .finish_non_exhaustive()
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
    _peer: Option<PeerPlace>,
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
                        let cred = io.peer_cred().ok().map(|c| Cred {
                            pid: c.pid(),
                            uid: c.uid(),
                        });
                        let key = limits.peers.attribute(cred);
                        tracing::debug!(connection = id, peer = %key, "connection accepted");
                        let (peer, peer_place, refused) = match limits.peers.connect(key) {
                            Ok((peer, place)) => (peer, Some(place), None),
                            Err((peer, msg)) => {
                                // Kept open so that its streams can be told
                                // why; it proves nothing, so it is the first
                                // to make room, and closes at
                                // SDS_HANDSHAKE_TIMEOUT.
                                crate::metrics::refused(crate::metrics::Refusal::Limits);
                                limits.warn(
                                    "SDS_PEER_MAX_CONNECTIONS",
                                    format!("connection {id}: refusing its streams: {msg}"),
                                );
                                (peer, None, Some(msg))
                            }
                        };
                        let conn =
                            Arc::new(Connection::of_peer(id, limits.config(), peer, refused));
                        limits.unproven_connections.register(&conn.proof);
                        let io = ConnIo {
                            io,
                            conn,
                            limits: limits.clone(),
                            _place: place,
                            _peer: peer_place,
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
#[path = "logins_tests.rs"]
mod tests;

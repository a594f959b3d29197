//! The bounds every socket of the agent shares: connections and streams in
//! total, streams per connection, the deadline of a stream's first request,
//! and the rule that a bound being hit is logged as one warning per interval
//! ([`super::warn`]), so that a flood cannot flood the log too.
//!
//! A stream's place is taken before its request is read and held until its
//! response ends ([`StreamGuard`]), so a client that opens streams and sends
//! nothing holds no more than its share either. How requests are read, with
//! their size, time and buffer bounds, is [`super::framing`].

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tokio::sync::Semaphore;
use tonic::Status;

use super::caps::CapPlace;
use super::connection::Connection;
use super::framing::{FramingError, RequestReader};
use super::peers::Peers;
use super::unproven::{Proof, Unproven};
use super::warn::{shorten, Warnings};
use crate::config::SdsLimits;
use crate::metrics::{self, Refusal};
use crate::secrets::SecretError;

pub use super::warn::{more, WARN_INTERVAL};

/// The bounds shared by every connection.
pub struct Limits {
    cfg: SdsLimits,
    streams: AtomicUsize,
    connections: AtomicUsize,
    /// Bytes of requests not yet complete, over every stream
    /// (`SDS_MAX_BUFFERED_REQUEST_BYTES`; see [`super::framing`]).
    request_budget: Arc<Semaphore>,
    /// Connections and streams that have proven no credential yet, oldest
    /// first: they make room at the caps (see [`super::unproven`]).
    pub(crate) unproven_connections: Unproven,
    unproven_streams: Unproven,
    /// Every peer's share of the places (see [`super::peers`]).
    pub(crate) peers: Peers,
    warnings: Warnings,
}

impl Limits {
    pub fn new(cfg: SdsLimits) -> Arc<Self> {
        Arc::new(Self {
            request_budget: Arc::new(Semaphore::new(cfg.max_buffered_request_bytes)),
            streams: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            unproven_connections: Unproven::default(),
            unproven_streams: Unproven::default(),
            peers: Peers::new(&cfg),
            warnings: Warnings::default(),
            cfg,
        })
    }

    pub fn config(&self) -> &SdsLimits {
        &self.cfg
    }

    /// A reader of a stream's requests, under the shared budget; `window`
    /// lends the stream HTTP/2 window for the rest of a message it budgeted.
    pub(crate) fn reader(
        &self,
        body: tonic::body::Body,
        window: Option<h2::StreamWindow>,
    ) -> RequestReader {
        RequestReader::new(
            body,
            self.request_budget.clone(),
            self.cfg.max_request_bytes,
            self.cfg.first_request_timeout,
        )
        .lending(window, super::server::STREAM_WINDOW)
    }

    /// Streams open over all connections.
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Counts a new connection. At `SDS_MAX_CONNECTIONS`, the oldest
    /// connection that has proven nothing is evicted to make room (it
    /// closes, and is counted out, moments later); false (and a warning)
    /// when every connection has proven a credential.
    pub(crate) fn connection_opened(&self) -> bool {
        let max = self.cfg.max_connections;
        if self.connections.fetch_add(1, Ordering::SeqCst) >= max {
            if self.unproven_connections.evict_oldest() {
                self.warn(
                    "SDS_MAX_CONNECTIONS (evicting)",
                    format!(
                        "SDS_MAX_CONNECTIONS={max} reached: closing the oldest connection that has \
                         proven no credential, to make room for a new one"
                    ),
                );
                return true;
            }
            self.connections.fetch_sub(1, Ordering::SeqCst);
            metrics::refused(Refusal::Limits);
            self.warn(
                "SDS_MAX_CONNECTIONS",
                format!(
                    "SDS_MAX_CONNECTIONS={max} reached: closing a new connection at once; \
                     the connections already open keep being served"
                ),
            );
            return false;
        }
        true
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::SeqCst);
    }

    /// Takes a place for a new stream on `conn`, or refuses it with
    /// `RESOURCE_EXHAUSTED` naming the bound (and logs one warning per
    /// interval). Streams already open are not affected.
    pub fn open_stream(self: &Arc<Self>, conn: &Arc<Connection>) -> Result<StreamSlot, Status> {
        if let Some(msg) = &conn.refused {
            metrics::refused(Refusal::Limits);
            self.warn(
                "SDS_PEER_MAX_CONNECTIONS",
                format!("connection {}: refusing a stream: {msg}", conn.id),
            );
            return Err(Status::resource_exhausted(msg.clone()));
        }
        let per_conn = self.cfg.connection_max_streams;
        if conn.streams.fetch_add(1, Ordering::SeqCst) >= per_conn {
            conn.streams.fetch_sub(1, Ordering::SeqCst);
            metrics::refused(Refusal::Limits);
            let msg = format!(
                "too many streams on one connection: SDS_CONNECTION_MAX_STREAMS={per_conn} are open \
                 (an Envoy needs 2); close one or raise SDS_CONNECTION_MAX_STREAMS"
            );
            self.warn(
                "SDS_CONNECTION_MAX_STREAMS",
                format!("connection {}: refusing a stream: {msg}", conn.id),
            );
            return Err(Status::resource_exhausted(msg));
        }
        if let Err(msg) = conn.peer.open_stream() {
            conn.streams.fetch_sub(1, Ordering::SeqCst);
            metrics::refused(Refusal::Limits);
            self.warn(
                "SDS_PEER_MAX_STREAMS",
                format!("connection {}: refusing a stream: {msg}", conn.id),
            );
            return Err(Status::resource_exhausted(msg));
        }
        let total = self.cfg.max_streams;
        if self.streams.fetch_add(1, Ordering::SeqCst) >= total
            && !self.evict_unproven_stream(total)
        {
            self.streams.fetch_sub(1, Ordering::SeqCst);
            conn.streams.fetch_sub(1, Ordering::SeqCst);
            conn.peer.streams.fetch_sub(1, Ordering::SeqCst);
            metrics::refused(Refusal::Limits);
            let msg = format!(
                "the agent serves too many streams: SDS_MAX_STREAMS={total} are open; \
                 retry later or raise SDS_MAX_STREAMS"
            );
            self.warn(
                "SDS_MAX_STREAMS",
                format!("connection {}: refusing a stream: {msg}", conn.id),
            );
            return Err(Status::resource_exhausted(msg));
        }
        conn.opened_a_stream();
        let proof = Proof::new();
        self.unproven_streams.register(&proof);
        Ok(StreamSlot {
            limits: self.clone(),
            conn: conn.clone(),
            proof,
        })
    }

    /// At `SDS_MAX_STREAMS`: evicts the oldest stream that has not been
    /// served (it ends with `RESOURCE_EXHAUSTED`, and is counted out when it
    /// has), to make room for a new one; false when every stream has been.
    fn evict_unproven_stream(&self, total: usize) -> bool {
        if !self.unproven_streams.evict_oldest() {
            return false;
        }
        self.warn(
            "SDS_MAX_STREAMS (evicting)",
            format!(
                "SDS_MAX_STREAMS={total} reached: ending the oldest stream that has proven no \
                 credential, to make room for a new one"
            ),
        );
        true
    }

    /// Logs `message` as a warning, at most once per interval per bound
    /// (see [`Warnings::warn`]).
    pub fn warn(&self, bound: &'static str, message: String) {
        self.warnings.warn(bound, message);
    }

    /// Whether a line about `key` may be logged now (see
    /// [`Warnings::throttle`]).
    pub fn throttle(&self, key: &'static str) -> Option<u64> {
        self.warnings.throttle(key)
    }
}

impl Limits {
    /// Logs why a request was refused, and counts it: a bound reached is one
    /// warning per interval; a repeat of a rejection the CA gave moments ago
    /// (Envoy reconnecting) is debug; anything else is an error.
    pub(crate) fn log_refusal(&self, stream: u64, what: &str, e: &SecretError) {
        metrics::refused(e.refusal());
        if let SecretError::LimitReached { setting, .. } = e {
            self.warn(setting, format!("stream {stream}: {what}"));
        } else if e.is_repeat() {
            tracing::debug!(stream, "{what}");
        } else {
            tracing::error!(stream, "{what}");
        }
    }

    /// Logs (at most one line per interval) and counts a stream ended
    /// because its credential no longer holds: its JWT expired, or the CA
    /// rejected it at a renewal. Expected once per token lifetime for a
    /// stream kept open that long, so info, not a warning.
    pub(crate) fn credential_ended(&self, stream: u64, status: &Status) {
        metrics::refused(Refusal::Credential);
        if let Some(n) = self.throttle("credential ended") {
            tracing::info!(stream, code = ?status.code(), "ending the stream: {}{}", status.message(), more(n));
        }
    }

    /// Logs why a stream's request could not be read (too large, not
    /// protobuf, too late): one warning per interval for each reason, as a
    /// client that sends them is most likely attacking.
    pub(crate) fn inbound_error(&self, stream: u64, conn: &Connection, error: &FramingError) {
        let cfg = self.config();
        let (bound, what, reason) = match error {
            FramingError::TooLarge { .. } => (
                "SDS_MAX_REQUEST_BYTES",
                format!(
                    "a request larger than SDS_MAX_REQUEST_BYTES={}",
                    cfg.max_request_bytes
                ),
                Refusal::Limits,
            ),
            // HTTP/2's own flood guards closed the connection (GOAWAY
            // ENHANCE_YOUR_CALM), failing the body reads of its streams.
            FramingError::Transport(s) if s.code() == tonic::Code::ResourceExhausted => (
                "HTTP/2 flood guard",
                "a stream of a connection HTTP/2 closed for flooding (GOAWAY ENHANCE_YOUR_CALM)"
                    .to_string(),
                Refusal::Limits,
            ),
            FramingError::Malformed(_) | FramingError::Compressed => (
                "malformed request",
                "a malformed request".to_string(),
                Refusal::InvalidRequest,
            ),
            FramingError::Deadline(timeout) => (
                "SDS_FIRST_REQUEST_TIMEOUT",
                format!(
                    "a stream with no complete request within SDS_FIRST_REQUEST_TIMEOUT={timeout:?}"
                ),
                Refusal::Limits,
            ),
            FramingError::Transport(_) | FramingError::Gone | FramingError::ShuttingDown => {
                tracing::debug!(stream, connection = conn.id, error = %error, "stream ended with an error");
                return;
            }
        };
        metrics::refused(reason);
        let status = error.status();
        self.warn(
            bound,
            format!(
                "connection {}: refusing {what} with {:?}: {}",
                conn.id,
                status.code(),
                shorten(status.message(), 256)
            ),
        );
    }
}

/// A stream's place under `SDS_MAX_STREAMS`, `SDS_CONNECTION_MAX_STREAMS`
/// and `SDS_PEER_MAX_STREAMS`;
/// given back when dropped.
pub struct StreamSlot {
    limits: Arc<Limits>,
    conn: Arc<Connection>,
    /// Whether the stream has proven a credential (see [`super::unproven`]).
    pub(crate) proof: Arc<Proof>,
}

impl std::fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamSlot(connection {})", self.conn.id)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.limits.streams.fetch_sub(1, Ordering::SeqCst);
        self.conn.streams.fetch_sub(1, Ordering::SeqCst);
        self.conn.peer.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Everything a stream holds of the bounds: its [`StreamSlot`], and its
/// place under its socket's own caps if it has any.
#[derive(Debug)]
pub struct StreamGuard {
    pub slot: StreamSlot,
    pub place: Option<CapPlace>,
}

/// A response body that holds its stream's [`StreamGuard`] until hyper drops
/// it: when the response has ended or the client reset the stream. A stream
/// evicted to make room ([`super::unproven`]) ends here with
/// `RESOURCE_EXHAUSTED`, whatever its protocol.
pub struct Guarded<B> {
    pub inner: B,
    pub guard: StreamGuard,
    /// The eviction's status was sent: the response has ended.
    pub evicted: bool,
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.evicted {
            return Poll::Ready(None);
        }
        if self.guard.slot.proof.poll_evicted(cx) {
            self.evicted = true;
            let total = self.guard.slot.limits.cfg.max_streams;
            let status = Status::resource_exhausted(format!(
                "SDS_MAX_STREAMS={total} reached and this stream had proven no credential: ended \
                 to make room for a new one; send a request with the workload's JWT promptly"
            ));
            let mut trailers = tonic::codegen::http::HeaderMap::new();
            if status.add_header(&mut trailers).is_ok() {
                metrics::refused(Refusal::Limits);
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.evicted || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(per_conn: usize, total: usize) -> Arc<Limits> {
        Limits::new(SdsLimits {
            connection_max_streams: per_conn,
            max_streams: total,
            max_connections: 2,
            first_request_timeout: Duration::from_secs(5),
            ..SdsLimits::default()
        })
    }

    #[test]
    fn streams_are_capped_per_connection_and_in_total_and_given_back() {
        let l = limits(2, 3);
        let cfg = l.config().clone();
        let (a, b) = (
            Arc::new(Connection::new(1, &cfg)),
            Arc::new(Connection::new(2, &cfg)),
        );
        let a1 = l.open_stream(&a).unwrap();
        let _a2 = l.open_stream(&a).unwrap();
        let e = l.open_stream(&a).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("SDS_CONNECTION_MAX_STREAMS=2"),
            "{e:?}"
        );
        let b1 = l.open_stream(&b).unwrap();
        // Every stream proven: none makes room.
        for s in [&a1, &_a2, &b1] {
            s.proof.prove();
        }
        let e = l.open_stream(&b).unwrap_err();
        assert!(e.message().contains("SDS_MAX_STREAMS=3"), "{e:?}");
        assert_eq!(
            (l.open_streams(), a.open_streams(), b.open_streams()),
            (3, 2, 1)
        );
        drop(a1);
        assert_eq!((l.open_streams(), a.open_streams()), (2, 1));
        let _b2 = l.open_stream(&b).unwrap();
    }

    #[test]
    fn at_the_total_the_oldest_unproven_stream_makes_room() {
        let l = limits(4, 3);
        let cfg = l.config().clone();
        let (a, b) = (
            Arc::new(Connection::new(1, &cfg)),
            Arc::new(Connection::new(2, &cfg)),
        );
        let proven = l.open_stream(&a).unwrap();
        proven.proof.prove();
        let oldest = l.open_stream(&b).unwrap();
        let younger = l.open_stream(&b).unwrap();
        // A fourth: the oldest unproven one is evicted, not the newcomer.
        let newcomer = l.open_stream(&a).unwrap();
        let evicted = |s: &StreamSlot| {
            let w = futures::task::noop_waker();
            s.proof.poll_evicted(&mut Context::from_waker(&w))
        };
        assert!(evicted(&oldest));
        assert!(!evicted(&proven) && !evicted(&younger) && !evicted(&newcomer));
        // Counted out once it has ended.
        drop(oldest);
        assert_eq!(l.open_streams(), 3);
        for s in [&younger, &newcomer] {
            s.proof.prove();
        }
        let e = l.open_stream(&b).unwrap_err();
        assert!(e.message().contains("SDS_MAX_STREAMS=3"), "{e:?}");
    }

    #[test]
    fn connections_are_capped() {
        let l = limits(2, 3);
        assert!(l.connection_opened() && l.connection_opened());
        assert!(!l.connection_opened());
        l.connection_closed();
        assert!(l.connection_opened());
    }

    #[tokio::test(start_paused = true)]
    async fn one_warning_per_interval() {
        let l = limits(1, 1);
        l.warn("X", "first".into());
        for _ in 0..5 {
            l.warn("X", "again".into());
        }
        assert_eq!(l.throttle("X"), None, "held back within the interval");
        tokio::time::advance(WARN_INTERVAL).await;
        assert_eq!(
            l.throttle("X"),
            Some(6),
            "the count goes out with the next line"
        );
        assert_eq!(l.throttle("X"), None);
    }
}

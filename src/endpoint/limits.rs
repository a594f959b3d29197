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
    warnings: Warnings,
}

impl Limits {
    pub fn new(cfg: SdsLimits) -> Arc<Self> {
        Arc::new(Self {
            request_budget: Arc::new(Semaphore::new(cfg.max_buffered_request_bytes)),
            cfg,
            streams: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            warnings: Warnings::default(),
        })
    }

    pub fn config(&self) -> &SdsLimits {
        &self.cfg
    }

    /// A reader of a stream's requests, under the shared budget.
    pub(crate) fn reader(&self, body: tonic::body::Body) -> RequestReader {
        RequestReader::new(
            body,
            self.request_budget.clone(),
            self.cfg.max_request_bytes,
            self.cfg.first_request_timeout,
        )
    }

    /// Streams open over all connections.
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Counts a new connection; false (and a warning) when it is one too many.
    pub(crate) fn connection_opened(&self) -> bool {
        let max = self.cfg.max_connections;
        if self.connections.fetch_add(1, Ordering::SeqCst) >= max {
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
        let total = self.cfg.max_streams;
        if self.streams.fetch_add(1, Ordering::SeqCst) >= total {
            self.streams.fetch_sub(1, Ordering::SeqCst);
            conn.streams.fetch_sub(1, Ordering::SeqCst);
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
        Ok(StreamSlot {
            limits: self.clone(),
            conn: conn.clone(),
        })
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

/// A stream's place under `SDS_MAX_STREAMS` and `SDS_CONNECTION_MAX_STREAMS`;
/// given back when dropped.
pub struct StreamSlot {
    limits: Arc<Limits>,
    conn: Arc<Connection>,
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
/// it: when the response has ended or the client reset the stream.
pub struct Guarded<B> {
    pub inner: B,
    pub guard: StreamGuard,
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
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
        let _b1 = l.open_stream(&b).unwrap();
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

//! Reading gRPC request messages off a stream's HTTP/2 body, with bounded
//! memory.
//!
//! tonic's decoder keeps a stream's buffer at the size of the largest message
//! it ever received, and an Envoy sends its whole node (every extension it
//! was built with: about 60 KiB for Envoy 1.40) with every request, ACKs
//! included. Kept for every open stream, that is most of what a stream
//! costs. So requests are read here instead:
//!
//! - a message's bytes are held only until it decodes, then freed, and a
//!   field its type does not read ([`Request::DROPPED_FIELD`]: the node, in
//!   SDS) is dropped as it arrives, never held at all;
//! - a message larger than `SDS_MAX_REQUEST_BYTES` is refused from its
//!   header, before its bytes are read (`RESOURCE_EXHAUSTED`);
//! - bytes of messages not yet complete count against one budget shared by
//!   every stream (`SDS_MAX_BUFFERED_REQUEST_BYTES`): a stream that would pass
//!   it waits, and HTTP/2 flow control makes its client wait too. A message
//!   takes its whole size from the budget at once, when its prefix arrives,
//!   so that no stream waits for budget while holding part of it (streams
//!   each holding half a message would wait on each other until their
//!   deadlines: a storm of Envoys, each sending ~60 KiB, did);
//! - a stream's first message must be complete within
//!   `SDS_FIRST_REQUEST_TIMEOUT` of the stream opening, and any later one
//!   within it of its first byte (`DEADLINE_EXCEEDED`), so that no client
//!   holds budget by trickling;
//! - a message that is not a valid protobuf is `INVALID_ARGUMENT`; a
//!   compressed one (which node-agent never offers) `UNIMPLEMENTED`.
//!
//! Responses are still encoded by tonic: they are small and the agent's own.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http_body::Body as _;
use prost::bytes::Bytes;
use prost::Message;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};

use partial::Partial;

#[path = "framing_partial.rs"]
mod partial;

/// Why a stream's request could not be read. Each kind is its own bound or
/// fault, so that the log and the metrics can name it without reading text.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// A message announced more than `SDS_MAX_REQUEST_BYTES`.
    #[error("the request is {size} bytes, more than SDS_MAX_REQUEST_BYTES={max}")]
    TooLarge { size: usize, max: usize },
    /// Not a gRPC message, not a valid protobuf, or cut short.
    #[error("{0}")]
    Malformed(String),
    /// A compressed message: node-agent never offers compression.
    #[error("compressed requests are not accepted (send without grpc-encoding)")]
    Compressed,
    /// No complete message within `SDS_FIRST_REQUEST_TIMEOUT`.
    #[error(
        "no complete request within SDS_FIRST_REQUEST_TIMEOUT={0:?} (of the stream opening, or of \
         the request's first byte); send whole requests promptly"
    )]
    Deadline(Duration),
    /// HTTP/2 failed the stream's body: a reset, or the connection closed
    /// (for flooding, `RESOURCE_EXHAUSTED`).
    #[error("{}", .0.message())]
    Transport(Status),
    /// The client reset the stream (RST_STREAM CANCEL): it has left, and
    /// is owed nothing more.
    #[error("the client reset the stream")]
    Gone,
    /// The request budget was closed: the agent is stopping.
    #[error("the agent is shutting down")]
    ShuttingDown,
}

impl FramingError {
    /// The gRPC status the stream ends with.
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            Self::TooLarge { .. } => Status::resource_exhausted(msg),
            Self::Malformed(_) => Status::invalid_argument(msg),
            Self::Compressed => Status::unimplemented(msg),
            Self::Deadline(_) => Status::deadline_exceeded(msg),
            Self::Transport(s) => s.clone(),
            Self::Gone => Status::cancelled(msg),
            Self::ShuttingDown => Status::unavailable(msg),
        }
    }

    /// The code of [`Self::status`].
    pub fn code(&self) -> Code {
        self.status().code()
    }

    /// The message of [`Self::status`].
    pub fn message(&self) -> String {
        self.to_string()
    }
}

/// A request message as the reader reads it.
pub trait Request: Message + Default {
    /// A top-level length-delimited field that this type does not read and
    /// that the reader therefore drops as its bytes arrive, never buffering
    /// it: Envoy's `node`, ~60 KiB in the requests of SDS.
    const DROPPED_FIELD: Option<u32> = None;
}

/// Reads the request messages of one stream; see the module documentation.
/// Cancel-safe: what was read lives in the reader, not in the future.
pub struct RequestReader {
    body: Body,
    /// The message being read.
    msg: Partial,
    /// Bytes taken from the body and not yet read into `msg`: waiting for
    /// budget, or the start of the next message.
    pending: Option<Bytes>,
    /// Budget permits held: the whole size of the message being read.
    held: usize,
    budget: Arc<Semaphore>,
    max_message: usize,
    timeout: Duration,
    /// When the message being read must be complete.
    deadline: Option<Instant>,
    ended: bool,
    /// Lends the stream HTTP/2 window for the rest of a message whose whole
    /// size was taken from the budget, beyond `own_window`, the stream's
    /// own (see [`RequestReader::lending`]).
    window: Option<h2::StreamWindow>,
    own_window: usize,
}

impl RequestReader {
    /// A reader whose first message is due within `timeout` from now.
    pub fn new(body: Body, budget: Arc<Semaphore>, max_message: usize, timeout: Duration) -> Self {
        Self {
            body,
            msg: Partial::default(),
            pending: None,
            held: 0,
            budget,
            max_message,
            timeout,
            deadline: Some(Instant::now() + timeout),
            ended: false,
            window: None,
            own_window: 0,
        }
    }

    /// Lends the stream HTTP/2 window through `window` for the rest of each
    /// message once its whole size is taken from the budget: what the
    /// stream's own window (`own_window` bytes) does not cover. Without it a
    /// message arrives one window at a time, a round trip each (an Envoy's
    /// 60 KiB, four). It adds nothing to what a client can make the agent
    /// hold: the lent bytes are the message's, already counted in the
    /// budget, and the window is the stream's own again once they are read.
    pub fn lending(mut self, window: Option<h2::StreamWindow>, own_window: u32) -> Self {
        self.window = window;
        self.own_window = own_window as usize;
        self
    }

    /// The next message, `None` when the client has closed its side.
    pub async fn message<M: Request>(&mut self) -> Result<Option<M>, FramingError> {
        loop {
            if self.msg.complete() {
                return self.decode().map(Some);
            }
            if self.ended {
                if self.msg.is_empty() {
                    return Ok(None);
                }
                return Err(FramingError::Malformed(
                    "the request stream ended in the middle of a message".into(),
                ));
            }
            let mut chunk = match self.pending.take() {
                Some(c) => c,
                None => {
                    match self.next_frame().await? {
                        None => {
                            self.ended = true;
                            continue;
                        }
                        // A client resetting its stream is a client leaving,
                        // not one that has said all it will (a half-close):
                        // nothing is owed to it.
                        Some(Err(s)) if s.code() == Code::Cancelled => {
                            self.ended = true;
                            self.msg = Partial::default();
                            return Err(FramingError::Gone);
                        }
                        Some(Err(s)) => return Err(FramingError::Transport(s)),
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) if !data.is_empty() => data,
                            _ => continue, // trailers, or an empty frame
                        },
                    }
                }
            };
            if self.deadline.is_none() {
                // The first byte of a new message.
                self.deadline = Some(Instant::now() + self.timeout);
            }
            if let Some(size) = self.msg.size() {
                if size > self.held {
                    let more = (size - self.held) as u32;
                    match self.budget.try_acquire_many(more) {
                        Ok(permit) => permit.forget(),
                        Err(tokio::sync::TryAcquireError::Closed) => {
                            return Err(FramingError::ShuttingDown)
                        }
                        Err(tokio::sync::TryAcquireError::NoPermits) => {
                            // Kept aside while waiting, so that a deadline
                            // loses nothing.
                            self.pending = Some(chunk);
                            let budget = self.budget.clone();
                            let permit = within(
                                self.deadline,
                                self.timeout,
                                budget.acquire_many_owned(more),
                            )
                            .await?
                            .map_err(|_| FramingError::ShuttingDown)?;
                            permit.forget();
                            chunk = self.pending.take().unwrap_or_default();
                        }
                    }
                    self.held = size;
                    self.lend(chunk.len());
                }
            }
            self.msg
                .read(&mut chunk, M::DROPPED_FIELD, self.max_message)?;
            self.pending = (!chunk.is_empty()).then_some(chunk);
        }
    }

    /// Lends the window for the message just budgeted: its bytes not in
    /// hand (`in_hand` bytes taken from the body and not yet read into it)
    /// beyond the stream's own window.
    fn lend(&mut self, in_hand: usize) {
        let Some(window) = self.window.as_mut() else {
            return;
        };
        let to_come = self.msg.remaining.saturating_sub(in_hand);
        let lent = to_come.saturating_sub(self.own_window);
        if lent > 0 {
            window.lend(u32::try_from(lent).unwrap_or(u32::MAX));
        }
    }

    /// The body's next frame, within the message's deadline. A frame that is
    /// already there is taken without arming a timer.
    async fn next_frame(
        &mut self,
    ) -> Result<Option<Result<http_body::Frame<Bytes>, Status>>, FramingError> {
        let body = &mut self.body;
        let now = futures::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx)));
        match now.await {
            Poll::Ready(frame) => Ok(frame),
            Poll::Pending => within(self.deadline, self.timeout, next_frame(&mut self.body)).await,
        }
    }

    /// Decodes the complete message and readies the reader for the next.
    fn decode<M: Request>(&mut self) -> Result<M, FramingError> {
        let msg = std::mem::take(&mut self.msg);
        let n = self.held;
        self.held = 0;
        self.budget.add_permits(n);
        // The next message's deadline runs from its first byte; if that
        // is here already, from now.
        self.deadline = self
            .pending
            .is_some()
            .then(|| Instant::now() + self.timeout);
        super::codec::decode_message(msg.kept.freeze()).map_err(FramingError::Malformed)
    }
}

impl Drop for RequestReader {
    fn drop(&mut self) {
        self.budget.add_permits(self.held);
    }
}

/// `f`, unless `deadline` comes first.
async fn within<T>(
    deadline: Option<Instant>,
    timeout: Duration,
    f: impl std::future::Future<Output = T>,
) -> Result<T, FramingError> {
    match deadline {
        None => Ok(f.await),
        Some(at) => tokio::time::timeout_at(at, f)
            .await
            .map_err(|_| FramingError::Deadline(timeout)),
    }
}

async fn next_frame(body: &mut Body) -> Option<Result<http_body::Frame<Bytes>, Status>> {
    futures::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
}

#[cfg(test)]
#[path = "framing_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "framing_drop_tests.rs"]
mod drop_tests;

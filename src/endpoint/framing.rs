//! Reading gRPC request messages off a stream's HTTP/2 body, with bounded
//! memory.
//!
//! tonic's decoder keeps a stream's buffer at the size of the largest message
//! it ever received, and an Envoy sends its whole node (every extension it
//! was built with: about 60 KiB for Envoy 1.40) with every request, ACKs
//! included. Kept for every open stream, that is most of what a stream
//! costs. So requests are read here instead:
//!
//! - a message's bytes are held only until it decodes, then freed;
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
use std::time::Duration;

use http_body::Body as _;
use prost::bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};

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

/// gRPC's message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// Reads the request messages of one stream; see the module documentation.
/// Cancel-safe: what was read lives in the reader, not in the future.
pub struct RequestReader {
    body: Body,
    buf: BytesMut,
    /// Bytes taken from the body and not yet in `buf`: waiting for budget,
    /// or the start of the next message.
    pending: Option<Bytes>,
    /// Budget permits held: the whole size of the message in `buf`.
    held: usize,
    budget: Arc<Semaphore>,
    max_message: usize,
    timeout: Duration,
    /// When the message being read must be complete.
    deadline: Option<Instant>,
    ended: bool,
}

impl RequestReader {
    /// A reader whose first message is due within `timeout` from now.
    pub fn new(body: Body, budget: Arc<Semaphore>, max_message: usize, timeout: Duration) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            pending: None,
            held: 0,
            budget,
            max_message,
            timeout,
            deadline: Some(Instant::now() + timeout),
            ended: false,
        }
    }

    /// The next message, `None` when the client has closed its side.
    pub async fn message<M: Message + Default>(&mut self) -> Result<Option<M>, FramingError> {
        loop {
            if let Some(msg) = self.decode_buffered()? {
                return Ok(Some(msg));
            }
            if self.ended {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(FramingError::Malformed(
                    "the request stream ended in the middle of a message".into(),
                ));
            }
            let chunk = match self.pending.take() {
                Some(c) => c,
                None => {
                    match within(self.deadline, self.timeout, next_frame(&mut self.body)).await? {
                        None => {
                            self.ended = true;
                            continue;
                        }
                        // A client resetting its stream is a client leaving.
                        Some(Err(s)) if s.code() == Code::Cancelled => {
                            self.ended = true;
                            self.buf.clear();
                            continue;
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
            self.pending = Some(chunk.clone());
            let (take, size) = self.message_bounds(&chunk);
            if size > self.held {
                let budget = self.budget.clone();
                let permit = within(
                    self.deadline,
                    self.timeout,
                    budget.acquire_many_owned((size - self.held) as u32),
                )
                .await?
                .map_err(|_| FramingError::ShuttingDown)?;
                permit.forget();
                self.held = size;
            }
            // The whole message in one allocation, once its size is known:
            // grown a frame at a time, an Envoy's 60 KiB request left the
            // allocator the smaller buffers it outgrew.
            self.buf.reserve(size.saturating_sub(self.buf.len()));
            self.buf.extend_from_slice(&chunk[..take]);
            self.pending = (take < chunk.len()).then(|| chunk.slice(take..));
        }
    }

    /// How many bytes of `chunk` belong to the message being read (the rest
    /// start the next one), and the budget that message needs: its whole
    /// size once its prefix is known, else what is buffered so far.
    fn message_bounds(&self, chunk: &Bytes) -> (usize, usize) {
        let have = self.buf.len();
        if have + chunk.len() < PREFIX {
            return (chunk.len(), have + chunk.len());
        }
        let byte = |i: usize| {
            if i < have {
                self.buf[i]
            } else {
                chunk[i - have]
            }
        };
        let len = u32::from_be_bytes([byte(1), byte(2), byte(3), byte(4)]) as usize;
        if byte(0) != 0 || len > self.max_message {
            // Refused from its prefix (see `decode_buffered`): read no further.
            let take = PREFIX.saturating_sub(have);
            return (take, have + take);
        }
        let size = PREFIX + len;
        (chunk.len().min(size - have), size)
    }

    /// Decodes the first message in the buffer if it is complete.
    fn decode_buffered<M: Message + Default>(&mut self) -> Result<Option<M>, FramingError> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        match self.buf[0] {
            0 => {}
            1 => return Err(FramingError::Compressed),
            f => {
                return Err(FramingError::Malformed(format!(
                    "invalid gRPC message prefix (compression flag {f}); is this gRPC?"
                )))
            }
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_message {
            return Err(FramingError::TooLarge {
                size: len,
                max: self.max_message,
            });
        }
        if self.buf.len() < PREFIX + len {
            return Ok(None);
        }
        let mut message = self.buf.split_to(PREFIX + len);
        message.advance(PREFIX);
        self.release(PREFIX + len);
        let decoded =
            super::codec::decode_message(message.freeze()).map_err(FramingError::Malformed);
        if self.buf.is_empty() {
            // Give the allocation back: the next message may be far off.
            self.buf = BytesMut::new();
            self.deadline = None;
        } else {
            self.deadline = Some(Instant::now() + self.timeout);
        }
        decoded.map(Some)
    }

    fn release(&mut self, n: usize) {
        let n = n.min(self.held);
        self.held -= n;
        self.budget.add_permits(n);
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

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

/// gRPC's message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// The room first made for what is kept of a message whose type drops a
/// field.
const KEPT_START: usize = 128;

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
        }
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
                }
            }
            self.msg
                .read(&mut chunk, M::DROPPED_FIELD, self.max_message)?;
            self.pending = (!chunk.is_empty()).then_some(chunk);
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

/// One message as it arrives: its prefix, then its body with the dropped
/// field left out. Memory is held only for what is kept, and given back
/// when the message is decoded.
#[derive(Default)]
struct Partial {
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// Bytes of the body still to come.
    remaining: usize,
    kept: BytesMut,
    /// Where in `kept` the next top-level field starts; past its end while
    /// a kept field's value is still arriving.
    next_field: usize,
    /// Bytes of a dropped field still to come.
    dropping: usize,
    /// Fields are no longer told apart: an encoding the scan does not
    /// follow, left whole for the decoder to judge.
    keep_rest: bool,
}

impl Partial {
    fn is_empty(&self) -> bool {
        self.prefix_len == 0
    }

    /// The message's whole size, prefix included, once its prefix is in.
    fn size(&self) -> Option<usize> {
        (self.prefix_len == PREFIX).then(|| PREFIX + self.body_len())
    }

    fn body_len(&self) -> usize {
        u32::from_be_bytes([
            self.prefix[1],
            self.prefix[2],
            self.prefix[3],
            self.prefix[4],
        ]) as usize
    }

    fn complete(&self) -> bool {
        self.prefix_len == PREFIX && self.remaining == 0
    }

    /// Takes from `chunk` what belongs to this message. Returns once the
    /// prefix is complete (so that the message's budget is taken before its
    /// body is read), the message is, or the chunk is used up.
    fn read(
        &mut self,
        chunk: &mut Bytes,
        dropped: Option<u32>,
        max_message: usize,
    ) -> Result<(), FramingError> {
        if self.prefix_len < PREFIX {
            let n = (PREFIX - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&chunk[..n]);
            self.prefix_len += n;
            chunk.advance(n);
            if self.prefix_len == PREFIX {
                self.check_prefix(max_message)?;
                self.remaining = self.body_len();
                self.keep_rest = dropped.is_none();
                if self.keep_rest {
                    // The whole body in one allocation: grown a frame at a
                    // time, a large request left the allocator the smaller
                    // buffers it outgrew.
                    self.kept.reserve(self.remaining);
                } else {
                    // What is kept of a message with a dropped field is
                    // small (names, a version, a nonce): one allocation
                    // holds it, where growing from empty took several.
                    self.kept.reserve(self.remaining.min(KEPT_START));
                }
            }
            return Ok(());
        }
        while !chunk.is_empty() && self.remaining > 0 {
            let n = if self.dropping > 0 {
                let n = self.dropping.min(chunk.len()).min(self.remaining);
                self.dropping -= n;
                chunk.advance(n);
                self.remaining -= n;
                continue;
            } else if self.keep_rest {
                self.remaining
            } else if self.next_field > self.kept.len() {
                self.next_field - self.kept.len()
            } else {
                // A field header, a byte at a time, so that no byte of a
                // dropped value is kept.
                1
            };
            let n = n.min(chunk.len()).min(self.remaining);
            self.kept.extend_from_slice(&chunk[..n]);
            chunk.advance(n);
            self.remaining -= n;
            if !self.keep_rest && self.next_field <= self.kept.len() {
                self.scan_header(dropped);
            }
        }
        if self.remaining == 0 && self.dropping > 0 {
            return Err(FramingError::Malformed(
                "the request is not a valid protobuf: a field runs past the end of the message"
                    .into(),
            ));
        }
        Ok(())
    }

    fn check_prefix(&self, max_message: usize) -> Result<(), FramingError> {
        match self.prefix[0] {
            0 => {}
            1 => return Err(FramingError::Compressed),
            f => {
                return Err(FramingError::Malformed(format!(
                    "invalid gRPC message prefix (compression flag {f}); is this gRPC?"
                )))
            }
        }
        let len = self.body_len();
        if len > max_message {
            return Err(FramingError::TooLarge {
                size: len,
                max: max_message,
            });
        }
        Ok(())
    }

    /// Reads the field header at `next_field` if it is all in: a dropped
    /// field's header is taken back out and its value skipped, any other
    /// field is kept whole.
    fn scan_header(&mut self, dropped: Option<u32>) {
        let header = &self.kept[self.next_field..];
        let Some((key, tag_len)) = varint(header) else {
            // Longer than a varint can be: not a header the scan follows.
            if header.len() >= 10 {
                self.keep_rest = true;
            }
            return;
        };
        let (field, wire_type) = (key >> 3, key & 7);
        let value_at = self.next_field + tag_len;
        let rest = &self.kept[value_at..];
        let end = match wire_type {
            0 => match varint(rest) {
                Some((_, n)) => value_at + n,
                None if rest.len() >= 10 => return self.keep_rest = true,
                None => return,
            },
            1 => value_at + 8,
            5 => value_at + 4,
            2 => match varint(rest) {
                Some((len, n)) => {
                    let Ok(len) = usize::try_from(len) else {
                        return self.keep_rest = true;
                    };
                    if Some(field) == dropped.map(u64::from) {
                        self.kept.truncate(self.next_field);
                        self.dropping = len;
                        return;
                    }
                    (value_at + n).saturating_add(len)
                }
                None if rest.len() >= 10 => return self.keep_rest = true,
                None => return,
            },
            // Groups, or no wire type at all: the decoder judges the rest.
            _ => return self.keep_rest = true,
        };
        self.next_field = end;
    }
}

/// A protobuf varint at the start of `b` and its length; `None` if it is not
/// all there (or longer than a varint can be).
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
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

//! A streaming method's responses, as the HTTP/2 body hyper sends: the
//! stream's own loop is polled in place by the body, inside the task that
//! hyper runs for the HTTP/2 stream, and each response it hands over is
//! framed as gRPC here (as tonic's server codec frames it: a message per
//! `DATA` payload, the status in the trailers).
//!
//! A stream costs no task of its own and no codec buffers: an open stream
//! that waits holds its loop's state, a two-response queue and this body.
//! The loop runs while hyper polls the body, that is while the stream may
//! send (its HTTP/2 send window is open); a client that stops reading its
//! responses stops its own stream, nothing else. When the client resets
//! the stream or its connection ends, hyper drops the body, and with it the
//! loop and whatever it was waiting for (a fetch among them).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use http_body::Frame;
use prost::bytes::Bytes;
use prost::Message;
use tonic::codegen::http::HeaderMap;
use tonic::Status;

use super::codec;

/// The loop that serves one stream; it ends when the stream does.
pub type Loop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How many responses may wait for the body before the loop waits too.
const WAITING: usize = 2;

/// Where the loop hands its responses over to the body (an error ends the
/// stream with that status). The loop runs only inside the body's poll, so
/// this is a small queue under a lock, not a channel between tasks (tokio's
/// would take about 800 bytes per open stream). Boxed: a response is
/// ~150 bytes and most streams hold none.
pub struct Outbound<T>(Arc<Mutex<Handoff<T>>>);

struct Handoff<T> {
    waiting: VecDeque<Box<Result<T, Status>>>,
    /// How many may wait ([`WAITING`]).
    room: usize,
    /// The loop, waiting for room.
    sender: Option<Waker>,
}

/// The body's side of an [`Outbound`].
pub struct Inbound<T>(Arc<Mutex<Handoff<T>>>);

/// An [`Outbound`] and the body's side of it.
pub fn channel<T>() -> (Outbound<T>, Inbound<T>) {
    with_room(WAITING)
}

/// A [`channel`] where `room` responses may wait.
pub(crate) fn with_room<T>(room: usize) -> (Outbound<T>, Inbound<T>) {
    let shared = Arc::new(Mutex::new(Handoff {
        waiting: VecDeque::new(),
        room,
        sender: None,
    }));
    (Outbound(shared.clone()), Inbound(shared))
}

fn lock<T>(m: &Mutex<Handoff<T>>) -> std::sync::MutexGuard<'_, Handoff<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T> Outbound<T> {
    /// Hands `item` over, once there is room for it.
    pub async fn send(&self, item: Box<Result<T, Status>>) {
        let mut item = Some(item);
        std::future::poll_fn(|cx| {
            let mut h = lock(&self.0);
            if h.waiting.len() < h.room {
                h.waiting.extend(item.take());
                Poll::Ready(())
            } else {
                h.sender = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl<T> Inbound<T> {
    /// The next response handed over, if any.
    pub(crate) fn take(&self) -> Option<Box<Result<T, Status>>> {
        let mut h = lock(&self.0);
        let item = h.waiting.pop_front();
        if item.is_some() {
            if let Some(w) = h.sender.take() {
                w.wake();
            }
        }
        item
    }
}

/// The body of a streaming method's response: it polls the stream's loop,
/// sends each message it hands over, then the status in the trailers
/// (`OK` when the loop ends without one).
pub struct StreamBody<T> {
    run: Option<Loop>,
    rx: Inbound<T>,
    /// The trailers are sent: the body is over.
    done: bool,
}

impl<T> StreamBody<T> {
    pub fn new(run: Loop, rx: Inbound<T>) -> Self {
        Self {
            run: Some(run),
            rx,
            done: false,
        }
    }

    /// The last frame: `status` in the trailers. The loop is dropped with
    /// it: nothing it does after can reach the client.
    fn end(&mut self, status: Status) -> Frame<Bytes> {
        self.done = true;
        self.run = None;
        let mut trailers = HeaderMap::new();
        // `add_header` writes `grpc-status`, then the message
        // percent-encoded and any details in base64: all valid header
        // values, so its error cannot come.
        let _ = status.add_header(&mut trailers);
        Frame::trailers(trailers)
    }
}

impl<T: Message> http_body::Body for StreamBody<T> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // The loop first, so that what it hands over now is sent in this
        // poll. It is polled at every poll of the body (it hands over only
        // here, and a loop waiting for room finds it after the body took a
        // response); when it ends, what it handed over is sent, then `OK`.
        if let Some(run) = &mut this.run {
            if run.as_mut().poll(cx).is_ready() {
                this.run = None;
            }
        }
        match this.rx.take() {
            Some(item) => Poll::Ready(Some(Ok(match *item {
                Ok(msg) => match codec::frame(&msg) {
                    Ok(data) => Frame::data(data),
                    Err(status) => this.end(status),
                },
                Err(status) => this.end(status),
            }))),
            None if this.run.is_none() => Poll::Ready(Some(Ok(this.end(Status::ok(""))))),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
#[path = "responses_tests.rs"]
mod tests;

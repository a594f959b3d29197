//! A streaming method's responses, as the HTTP/2 body hyper sends: the
//! stream's own loop is polled in place by the body, inside the task that
//! hyper runs for the HTTP/2 stream, and each response it hands over is
//! framed as gRPC here (as tonic's server codec frames it: a message per
//! `DATA` payload, the status in the trailers).
//!
//! A stream costs no task of its own and no codec buffers: an open stream
//! that waits holds its loop's state, a two-slot channel and this body.
//! The loop runs while hyper polls the body, that is while the stream may
//! send (its HTTP/2 send window is open); a client that stops reading its
//! responses stops its own stream, nothing else. When the client resets
//! the stream or its connection ends, hyper drops the body, and with it the
//! loop and whatever it was waiting for (a fetch among them).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use prost::bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tonic::codegen::http::HeaderMap;
use tonic::Status;

use super::codec;

/// The loop that serves one stream; it ends when the stream does.
pub type Loop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the loop hands its responses over (an error ends the stream with
/// that status). Boxed: a channel allocates its slots 32 at a time whatever
/// its bound, and an unboxed response slot is ~150 bytes.
pub type Outbound<T> = mpsc::Sender<Box<Result<T, Status>>>;

/// A channel for [`Outbound`]: two responses may wait for the body.
pub fn channel<T>() -> (Outbound<T>, mpsc::Receiver<Box<Result<T, Status>>>) {
    mpsc::channel(2)
}

/// The body of a streaming method's response: it polls the stream's loop,
/// sends each message it hands over, then the status in the trailers
/// (`OK` when the loop ends without one).
pub struct StreamBody<T> {
    run: Option<Loop>,
    rx: mpsc::Receiver<Box<Result<T, Status>>>,
    /// The trailers are sent: the body is over.
    done: bool,
}

impl<T> StreamBody<T> {
    pub fn new(run: Loop, rx: mpsc::Receiver<Box<Result<T, Status>>>) -> Self {
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
        // A status whose message cannot be a header value is sent as
        // tonic sends it: without trailers' details.
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
        // poll; when it ends, its sender is dropped with it, and the channel
        // yields what it still holds, then `None`.
        if let Some(run) = &mut this.run {
            if run.as_mut().poll(cx).is_ready() {
                this.run = None;
            }
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(Ok(match *item {
                Ok(msg) => match codec::frame(&msg) {
                    Ok(data) => Frame::data(data),
                    Err(status) => this.end(status),
                },
                Err(status) => this.end(status),
            }))),
            Poll::Ready(None) => Poll::Ready(Some(Ok(this.end(Status::ok(""))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
#[path = "responses_tests.rs"]
mod tests;

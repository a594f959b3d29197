//! The loop every stream runs, whatever its protocol: it reads the client's
//! requests, polls its [`Driver`] beside them, and stops when the client
//! leaves. A protocol ([`Protocol`]) answers requests and sends what
//! changed; nothing else of a stream's life is its concern.
//!
//! - Requests keep being read while a fetch waits on the CA, so an ACK, a
//!   changed subscription or the client leaving are handled at once.
//! - A client that half-closes (sends no more requests) while a fetch is
//!   pending is not cancelling: what it asked for is still answered, then
//!   the stream ends.
//! - A client that resets its stream, or whose connection ends, is gone:
//!   the loop is dropped with the stream's response body, which polls it
//!   ([`StreamBody`]), and its fetch with it.
//! - A request that cannot be read ends the stream with its status, logged
//!   once per interval per reason.
//!
//! The protocol's handlers are boxed: inline, their futures (a CA call
//! among them) would be part of every open stream's resting task, ~4 KiB
//! each; boxed, they take memory only while they run.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use tonic::Status;

use super::{Driver, Event, Surface};
use crate::endpoint::connection::Connection;
use crate::endpoint::credential::CredentialSource;
use crate::endpoint::framing::{FramingError, Request, RequestReader};
pub use crate::endpoint::responses::Outbound;
use crate::endpoint::responses::{self, StreamBody};
use crate::endpoint::server::Admitted;
use crate::endpoint::Endpoint;
use crate::secrets::SecretManager;

/// What a handler asks of the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Continue,
    End,
}

/// A handler's future, boxed (see the module documentation).
pub type Handler<'a> = Pin<Box<dyn Future<Output = Step> + Send + 'a>>;

/// What the loop borrows of a stream at once.
pub struct Parts<'a, T> {
    /// The resources served, for the log.
    pub what: &'a (dyn Display + Sync),
    pub driver: &'a mut Driver,
    pub out: &'a Outbound<T>,
}

/// One protocol's side of a stream.
pub trait Protocol: Send {
    /// A request message as read off the stream.
    type Request: Request + Send;
    /// A response message.
    type Response: Send + 'static;
    /// The stream reads one request, then only sends (the Workload API's
    /// methods); otherwise it reads requests until the client closes.
    const ONE_REQUEST: bool = false;

    fn parts(&mut self) -> Parts<'_, Self::Response>;

    /// Answers one request.
    fn on_request(&mut self, req: Self::Request) -> Handler<'_>;

    /// Sends what changed: after a fetch (`Some(new_identity)`, everything
    /// when it is another identity than before) or a change (`None`).
    fn send(&mut self, fetched: Option<bool>) -> Handler<'_>;

    /// The client closed its side before its one request
    /// ([`Self::ONE_REQUEST`]).
    fn no_request(&mut self) -> Status {
        Status::invalid_argument("the method carries one request message; none came")
    }
}

/// Starts an admitted stream of `surface`: its driver, proving the
/// credential `source` finds on the connection, and its protocol's side
/// (`protocol`, handed the driver and where responses go) run in the
/// returned body as hyper polls it.
pub(crate) fn start<P: Protocol + 'static>(
    surface: &'static Surface,
    manager: &Arc<SecretManager>,
    endpoint: &Endpoint,
    admitted: Admitted,
    source: impl FnOnce(&Connection) -> CredentialSource,
    protocol: impl FnOnce(Driver, Outbound<P::Response>) -> P,
) -> StreamBody<P::Response> {
    let Admitted {
        conn,
        reader,
        proof,
    } = admitted;
    let id = endpoint.next_stream_id();
    tracing::debug!(stream = id, connection = conn.id, "{} opened", surface.name);
    let source = source(&conn);
    let (tx, rx) = responses::channel();
    let driver = Driver::new(id, surface, manager.clone(), endpoint, conn, source, proof);
    StreamBody::new(Box::pin(run(protocol(driver, tx), reader)), rx)
}

/// Serves a stream until the client leaves, it fails, or shutdown.
pub async fn run<P: Protocol>(mut p: P, reader: RequestReader) {
    let mut inbound = Some(reader);
    let mut half_closed = false;
    let mut first_request = true;
    let id = p.parts().driver.id();
    let name = p.parts().driver.name();
    loop {
        let Parts { driver, what, out } = p.parts();
        let step = tokio::select! {
            msg = next_message::<P::Request>(&mut inbound) => match msg {
                Ok(Some(req)) => {
                    if P::ONE_REQUEST {
                        inbound = None;
                    }
                    // Whatever a first request says (a nonce, no names), the
                    // stream must carry a credential to stay open.
                    if std::mem::take(&mut first_request) {
                        if let Err(status) = driver.require_credential(what) {
                            fail(out, status).await;
                            break;
                        }
                    }
                    p.on_request(req).await
                }
                Ok(None) if P::ONE_REQUEST => {
                    let status = p.no_request();
                    fail(p.parts().out, status).await
                }
                Ok(None) if driver.waiting() => {
                    tracing::debug!(stream = id, "{} half-closed by the client; answering its request first", name);
                    inbound = None;
                    half_closed = true;
                    Step::Continue
                }
                Ok(None) => {
                    tracing::debug!(stream = id, "{} closed by the client", name);
                    Step::End
                }
                Err(FramingError::Gone) => {
                    tracing::debug!(stream = id, "{}: the client reset the stream", name);
                    Step::End
                }
                Err(e) => {
                    driver.limits().inbound_error(id, driver.conn(), &e);
                    fail(out, e.status()).await
                }
            },
            event = driver.next(what) => match event {
                Event::Fetched { new_identity } => match p.send(Some(new_identity)).await {
                    Step::Continue if half_closed && !p.parts().driver.waiting() => Step::End,
                    step => step,
                },
                Event::Changed => p.send(None).await,
                Event::End(Some(status)) => fail(p.parts().out, status).await,
                Event::End(None) => Step::End,
            },
        };
        if step == Step::End {
            break;
        }
    }
    tracing::debug!(
        stream = id,
        identity = ?p.parts().driver.identity(),
        "{} done",
        name
    );
}

/// Ends a stream with `status`.
pub async fn fail<T>(out: &Outbound<T>, status: Status) -> Step {
    out.send(Box::new(Err(status))).await;
    Step::End
}

/// Sends `msg`. (A client that is gone drops the stream's loop with its
/// response body: nothing is sent to no one.)
pub async fn send<T>(out: &Outbound<T>, msg: T) -> Step {
    out.send(Box::new(Ok(msg))).await;
    Step::Continue
}

/// The next request, while the stream still reads them; pending forever
/// once it does not.
async fn next_message<M: Request>(
    inbound: &mut Option<RequestReader>,
) -> Result<Option<M>, FramingError> {
    match inbound {
        Some(reader) => Box::pin(reader.message()).await,
        None => std::future::pending().await,
    }
}

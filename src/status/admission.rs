//! Who gets a place on the status port, decided by the first request head.
//!
//! A connection holds no place until its first request head is complete.
//! What has arrived when it is accepted is read then, before the next
//! connection is accepted: that is usually the whole head of a client that
//! sends its request at once, as kubelet does. Otherwise the connection is
//! *pending* ([`super::pending`]) until its head is complete. The head then
//! decides the place:
//!
//! - a health probe (`GET` or `HEAD` of `/healthz/live` or `/healthz/ready`)
//!   takes one of the places reserved for probes
//!   (`STATUS_PROBE_CONNECTIONS`) for that one request, then its connection
//!   is closed, as kubelet closes it;
//! - anything else takes one of the `STATUS_MAX_CONNECTIONS` places, kept
//!   while the connection is kept alive.
//!
//! So clients holding every ordinary place never keep a probe out, and
//! nothing but a probe's request enters a probe's place. A probe is told
//! from its request alone: another client asking for a probe path is
//! answered as a probe, which costs one short answer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The place a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A health probe: one request on a place reserved for probes.
    Probe,
    /// Anything else: an ordinary place, kept while kept alive.
    Other,
}

/// The paths a health probe asks for.
pub(super) const PROBE_PATHS: [&str; 2] = ["/healthz/live", "/healthz/ready"];

/// A connection's first request head, with what was read after it.
pub(super) struct Head {
    /// Every byte read so far, to be read again by the HTTP server.
    pub bytes: Vec<u8>,
    pub kind: Kind,
}

/// Why no request head was read.
#[derive(Debug, thiserror::Error)]
pub(super) enum HeadError {
    #[error("the request head is larger than STATUS_MAX_HEADER_BYTES={0}")]
    TooLarge(usize),
    #[error("the connection closed before its request head was complete")]
    Closed,
    #[error("cannot read the request head: {0}")]
    Io(#[from] io::Error),
}

/// The head, if `bytes` (what a connection sent first) holds all of it.
pub(super) fn complete(bytes: Vec<u8>) -> Result<Head, Vec<u8>> {
    match head_end(&bytes) {
        Some(end) => {
            let kind = kind_of(&bytes[..end]);
            Ok(Head { bytes, kind })
        }
        None => Err(bytes),
    }
}

/// Reads on from `bytes` until the blank line that ends the first request
/// head, at most `max` bytes of head, and tells what it asks for.
pub(super) async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
    mut bytes: Vec<u8>,
) -> Result<Head, HeadError> {
    loop {
        bytes = match complete(bytes) {
            Ok(head) => return Ok(head),
            Err(bytes) => bytes,
        };
        if bytes.len() >= max {
            return Err(HeadError::TooLarge(max));
        }
        bytes.reserve(1024.min(max - bytes.len()));
        let room = bytes.capacity().min(max) - bytes.len();
        let read = (&mut *io).take(room as u64).read_buf(&mut bytes).await?;
        if read == 0 {
            return Err(HeadError::Closed);
        }
    }
}

/// Where the head ends: after the first empty line (`\r\n\r\n`, or `\n\n`
/// as HTTP servers also accept).
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        match &bytes[i + 1..] {
            [b'\n', ..] => Some(i + 2),
            [b'\r', b'\n', ..] => Some(i + 3),
            _ => None,
        }
    })
}

/// A probe is `GET` or `HEAD` of a probe path (a query is allowed) over
/// HTTP/1.x; anything unusual is not one.
fn kind_of(head: &[u8]) -> Kind {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Kind::Other;
    };
    let path = target.split('?').next().unwrap_or_default();
    if matches!(method, "GET" | "HEAD")
        && PROBE_PATHS.contains(&path)
        && version.starts_with("HTTP/1.")
    {
        Kind::Probe
    } else {
        Kind::Other
    }
}

/// An IO whose first bytes, already read, are read again: the head read to
/// choose a place, then the rest of the connection.
pub(super) struct Rewound<T> {
    head: Vec<u8>,
    read: usize,
    io: T,
}

impl<T> Rewound<T> {
    pub fn new(head: Vec<u8>, io: T) -> Self {
        Self { head, read: 0, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.read < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.read);
            buf.put_slice(&this.head[this.read..this.read + n]);
            this.read += n;
            if this.read == this.head.len() {
                this.head = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewound<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn head_of(bytes: &[u8], max: usize) -> Result<Head, HeadError> {
        let (mut client, mut server) = tokio::io::duplex(64);
        let bytes = bytes.to_vec();
        let writer = tokio::spawn(async move {
            // In small pieces, as a slow client sends.
            for piece in bytes.chunks(7) {
                if client.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        let head = read_head(&mut server, max, Vec::new()).await;
        writer.abort();
        head
    }

    #[tokio::test]
    async fn probes_are_gets_of_the_health_paths() {
        for (request, kind) in [
            (&b"GET /healthz/live HTTP/1.1\r\nHost: 10.0.0.1:15020\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n"[..], Kind::Probe),
            (b"HEAD /healthz/ready HTTP/1.0\r\n\r\n", Kind::Probe),
            (b"GET /healthz/ready?verbose HTTP/1.1\n\n", Kind::Probe),
            (b"GET /metrics HTTP/1.1\r\n\r\n", Kind::Other),
            (b"GET /debug/identities HTTP/1.1\r\n\r\n", Kind::Other),
            (b"POST /healthz/live HTTP/1.1\r\n\r\n", Kind::Other),
            (b"GET /healthz/live/x HTTP/1.1\r\n\r\n", Kind::Other),
            (b"GET http://a/healthz/live HTTP/1.1\r\n\r\n", Kind::Other),
            (b"GET  /healthz/live HTTP/1.1\r\n\r\n", Kind::Other),
            (b"GET /healthz/live\r\n\r\n", Kind::Other),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Kind::Other),
        ] {
            let head = head_of(request, 8192).await.unwrap();
            assert_eq!(head.kind, kind, "{}", String::from_utf8_lossy(request));
            assert_eq!(head.bytes, request, "every byte is kept to be read again");
        }
    }

    #[tokio::test]
    async fn a_head_must_end_within_the_bound() {
        let mut long = b"GET /healthz/live HTTP/1.1\r\nX: ".to_vec();
        long.resize(9000, b'a');
        assert!(matches!(
            head_of(&long, 8192).await,
            Err(HeadError::TooLarge(8192))
        ));
        long.extend_from_slice(b"\r\n\r\n");
        assert!(head_of(&long, 8192).await.is_err());
        assert!(head_of(&long, 16384).await.is_ok());
        assert!(matches!(
            head_of(b"GET / HTTP/1.1\r\n", 8192).await,
            Err(HeadError::Closed)
        ));
    }

    #[tokio::test]
    async fn what_was_read_is_read_again_then_the_rest() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = Rewound::new(b"GET / HTTP/1.1\r\n\r\n".to_vec(), server);
        client.write_all(b"more").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\nmore");
    }
}

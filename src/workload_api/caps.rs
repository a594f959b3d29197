//! The Workload API's own caps (`WORKLOAD_API_MAX_CONNECTIONS`,
//! `WORKLOAD_API_MAX_STREAMS`), taken before the SDS bounds it shares with
//! the SDS socket: the shared caps bound the agent's worst case, these keep
//! a client of the Workload API from taking the places Envoy needs on the
//! SDS socket.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tonic::transport::server::Connected;
use tonic::Status;

use crate::config::SurfacesConfig;
use crate::metrics::{self, Refusal};
use crate::sds::connection::{incoming, SdsIo};
use crate::sds::limits::Limits;

/// Counts of the Workload API's connections and streams, under its caps.
pub struct ApiCaps {
    max_connections: usize,
    max_streams: usize,
    connections: AtomicUsize,
    streams: AtomicUsize,
}

impl ApiCaps {
    pub fn new(cfg: &SurfacesConfig) -> Arc<Self> {
        Arc::new(Self {
            max_connections: cfg.workload_api_max_connections,
            max_streams: cfg.workload_api_max_streams,
            connections: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
        })
    }

    /// Takes a place for a new stream, or refuses it with
    /// `RESOURCE_EXHAUSTED` naming the setting (one warning per interval).
    pub fn open_stream(self: &Arc<Self>, limits: &Limits) -> Result<ApiStreamPlace, Status> {
        let max = self.max_streams;
        if self.streams.fetch_add(1, Ordering::SeqCst) >= max {
            self.streams.fetch_sub(1, Ordering::SeqCst);
            metrics::refused(Refusal::Limits);
            let msg = format!(
                "too many Workload API streams: WORKLOAD_API_MAX_STREAMS={max} are open; \
                 close one or raise WORKLOAD_API_MAX_STREAMS"
            );
            limits.warn(
                "WORKLOAD_API_MAX_STREAMS",
                format!("refusing a Workload API stream: {msg}"),
            );
            return Err(Status::resource_exhausted(msg));
        }
        Ok(ApiStreamPlace(self.clone()))
    }

    /// Counts a new connection; false (and a warning) when it is one too many.
    fn connection_opened(&self, limits: &Limits) -> bool {
        let max = self.max_connections;
        if self.connections.fetch_add(1, Ordering::SeqCst) >= max {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            metrics::refused(Refusal::Limits);
            limits.warn(
                "WORKLOAD_API_MAX_CONNECTIONS",
                format!(
                    "WORKLOAD_API_MAX_CONNECTIONS={max} reached: closing a new Workload API \
                     connection at once; the connections already open keep being served"
                ),
            );
            return false;
        }
        true
    }
}

/// A stream's place under `WORKLOAD_API_MAX_STREAMS`; given back when dropped.
pub struct ApiStreamPlace(Arc<ApiCaps>);

impl Drop for ApiStreamPlace {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connections accepted on `listener` under the shared SDS bounds
/// ([`incoming`]) and then under `WORKLOAD_API_MAX_CONNECTIONS`: one past
/// either is closed at once.
pub fn incoming_within(
    listener: UnixListener,
    limits: Arc<Limits>,
    caps: Arc<ApiCaps>,
) -> impl Stream<Item = Result<ApiIo, io::Error>> {
    incoming(listener, limits.clone()).filter_map(move |accepted| {
        let (caps, limits) = (caps.clone(), limits.clone());
        async move {
            match accepted {
                Ok(io) if caps.connection_opened(&limits) => Some(Ok(ApiIo { io, caps })),
                // Dropping it closes it and gives back its shared place.
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        }
    })
}

/// An accepted Workload API connection: the SDS socket's connection state
/// (login budget, stream count) plus its place under
/// `WORKLOAD_API_MAX_CONNECTIONS`, given back when hyper drops it.
pub struct ApiIo {
    io: SdsIo,
    caps: Arc<ApiCaps>,
}

impl Drop for ApiIo {
    fn drop(&mut self) {
        self.caps.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connected for ApiIo {
    type ConnectInfo = <SdsIo as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for ApiIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ApiIo {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_and_given_back() {
        let caps = ApiCaps::new(&SurfacesConfig {
            workload_api_max_streams: 2,
            ..SurfacesConfig::default()
        });
        let limits = Limits::new(crate::config::SdsLimits::default());
        let a = caps.open_stream(&limits).unwrap();
        let _b = caps.open_stream(&limits).unwrap();
        let e = caps.open_stream(&limits).err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("WORKLOAD_API_MAX_STREAMS=2"), "{e:?}");
        drop(a);
        caps.open_stream(&limits).unwrap();
    }

    #[test]
    fn connections_are_capped() {
        let caps = ApiCaps::new(&SurfacesConfig {
            workload_api_max_connections: 1,
            ..SurfacesConfig::default()
        });
        let limits = Limits::new(crate::config::SdsLimits::default());
        assert!(caps.connection_opened(&limits));
        assert!(!caps.connection_opened(&limits));
        caps.connections.fetch_sub(1, Ordering::SeqCst);
        assert!(caps.connection_opened(&limits));
    }
}

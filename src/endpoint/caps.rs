//! A socket's own caps on connections and streams, taken before the bounds
//! every socket shares ([`super::limits`]): the shared bounds cap the agent's
//! worst case, a socket's own caps keep the clients of one socket (the
//! Workload API's, say) from taking the places another socket's clients
//! (Envoy on the SDS socket) need.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tonic::Status;

use super::limits::Limits;
use crate::metrics::{self, Refusal};

/// A socket's caps: their settings, for refusals that name them, and counts.
pub struct Caps {
    /// What the socket serves, for the log: `Workload API`.
    pub surface: &'static str,
    max_connections: (usize, &'static str),
    max_streams: (usize, &'static str),
    connections: AtomicUsize,
    streams: AtomicUsize,
}

impl std::fmt::Debug for Caps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caps")
            .field("surface", &self.surface)
            .field("connections", &self.connections)
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl Caps {
    /// Caps of `surface`: `max_connections` and `max_streams`, each with the
    /// name of its setting.
    pub fn new(
        surface: &'static str,
        max_connections: (usize, &'static str),
        max_streams: (usize, &'static str),
    ) -> Arc<Self> {
        Arc::new(Self {
            surface,
            max_connections,
            max_streams,
            connections: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
        })
    }

    /// Takes a place for a new stream, or refuses it with
    /// `RESOURCE_EXHAUSTED` naming the setting (one warning per interval).
    pub fn open_stream(self: &Arc<Self>, limits: &Limits) -> Result<CapPlace, Status> {
        let (max, setting) = self.max_streams;
        if self.streams.fetch_add(1, Ordering::SeqCst) >= max {
            self.streams.fetch_sub(1, Ordering::SeqCst);
            metrics::refused(Refusal::Limits);
            let msg = format!(
                "too many {} streams: {setting}={max} are open; close one or raise {setting}",
                self.surface
            );
            limits.warn(
                setting,
                format!("refusing a {} stream: {msg}", self.surface),
            );
            return Err(Status::resource_exhausted(msg));
        }
        Ok(CapPlace {
            caps: self.clone(),
            what: Held::Stream,
        })
    }

    /// Takes a place for a new connection; `None` (and a warning) when it
    /// is one too many.
    pub fn open_connection(self: &Arc<Self>, limits: &Limits) -> Option<CapPlace> {
        let (max, setting) = self.max_connections;
        if self.connections.fetch_add(1, Ordering::SeqCst) >= max {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            metrics::refused(Refusal::Limits);
            limits.warn(
                setting,
                format!(
                    "{setting}={max} reached: closing a new {} connection at once; \
                     the connections already open keep being served",
                    self.surface
                ),
            );
            return None;
        }
        Some(CapPlace {
            caps: self.clone(),
            what: Held::Connection,
        })
    }
}

#[derive(Debug)]
enum Held {
    Connection,
    Stream,
}

/// A connection's or a stream's place under its socket's caps; given back
/// when dropped.
#[derive(Debug)]
pub struct CapPlace {
    caps: Arc<Caps>,
    what: Held,
}

impl Drop for CapPlace {
    fn drop(&mut self) {
        let count = match self.what {
            Held::Connection => &self.caps.connections,
            Held::Stream => &self.caps.streams,
        };
        count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(conns: usize, streams: usize) -> Arc<Caps> {
        Caps::new(
            "Workload API",
            (conns, "WORKLOAD_API_MAX_CONNECTIONS"),
            (streams, "WORKLOAD_API_MAX_STREAMS"),
        )
    }

    #[test]
    fn streams_are_capped_and_given_back() {
        let caps = caps(1, 2);
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
        let caps = caps(1, 2);
        let limits = Limits::new(crate::config::SdsLimits::default());
        let a = caps.open_connection(&limits).unwrap();
        assert!(caps.open_connection(&limits).is_none());
        drop(a);
        assert!(caps.open_connection(&limits).is_some());
    }
}

//! Tools of the attack tests: the agent's resident memory sampled from /proc
//! while an attack runs, a gRPC client that sends arbitrary bytes as a
//! message, and raw HTTP/2 frames for a peer that goes silent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Samples the agent's resident set every few milliseconds on its own
/// thread, so that the peak of an attack is seen while it runs.
pub struct RssSampler {
    pid: u32,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(status_kib(pid, "VmRSS:")));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                p.fetch_max(status_kib(pid, "VmRSS:"), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            pid,
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the highest resident set seen, in MiB. The kernel's
    /// own high-water mark (`VmHWM`) is taken too, so that a spike between
    /// two samples is not missed.
    pub fn stop(mut self) -> f64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let sampled = self.peak.load(Ordering::SeqCst);
        let hwm = status_kib(self.pid, "VmHWM:");
        sampled.max(hwm) as f64 / 1024.0
    }
}

/// Sends and receives raw bytes as gRPC messages.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

/// A gRPC channel over the agent's socket, for the raw calls below.
pub async fn raw_channel(socket: &std::path::Path) -> Channel {
    node_agent::client::sds::channel(socket)
        .await
        .expect("connect to the agent's socket")
}

pub const FETCH_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";
pub const STREAM_SECRETS: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";

/// A unary call to `path` whose message is `bytes`, as the workload with `jwt`.
pub async fn raw_unary(
    channel: Channel,
    path: &'static str,
    bytes: Vec<u8>,
    jwt: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let req = super::sds_client::with_jwt(bytes, jwt);
    grpc.unary(
        req,
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A streaming call to `path` that sends `bytes` as its one message and
/// returns the first thing that comes back.
pub async fn raw_stream(
    channel: Channel,
    path: &'static str,
    bytes: Vec<u8>,
    jwt: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(bytes).await.unwrap();
    let req = super::sds_client::with_jwt(tokio_stream::wrappers::ReceiverStream::new(rx), jwt);
    let mut inbound = grpc
        .streaming(
            req,
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?
        .into_inner();
    let first = inbound.message().await;
    drop(tx);
    match first {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(tonic::Status::unknown("the stream ended without a message")),
        Err(s) => Err(s),
    }
}

/// The raw start of an HTTP/2 connection that opens a `StreamSecrets`
/// stream: the preface, empty SETTINGS, and one HEADERS frame (HPACK
/// literals, no Huffman). A client that sends this and then never reads or
/// writes again is a dead peer holding a stream.
pub fn h2_open_stream_bytes() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS, empty.
    out.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    let literal = |block: &mut Vec<u8>, index: u8, value: &str| {
        block.push(index); // literal without indexing, indexed name (4-bit prefix)
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    };
    literal(&mut block, 0x04, STREAM_SECRETS); // :path
    literal(&mut block, 0x01, "localhost"); // :authority
    for (name, value) in [("content-type", "application/grpc"), ("te", "trailers")] {
        block.push(0x00); // literal without indexing, new name
        block.push(name.len() as u8);
        block.extend(name.as_bytes());
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }
    let len = block.len() as u32;
    // HEADERS, END_HEADERS, stream 1.
    out.extend([
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        1,
        0x4,
        0,
        0,
        0,
        1,
    ]);
    out.extend(block);
    out
}

/// Reads server frames from a raw HTTP/2 connection until the HEADERS of
/// stream 1 arrive; true when they open a response (the stream was
/// accepted), false when they end it at once (refused).
pub async fn stream_one_accepted(socket: &mut tokio::net::UnixStream) -> bool {
    use tokio::io::AsyncReadExt;
    loop {
        let mut head = [0u8; 9];
        socket.read_exact(&mut head).await.expect("a frame header");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        socket
            .read_exact(&mut payload)
            .await
            .expect("a frame payload");
        if kind == 0x1 && stream == 1 {
            return flags & 0x1 == 0; // no END_STREAM: a response begins
        }
    }
}

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

/// The raw HEADERS frame that opens `StreamSecrets` stream `id` with `jwt`
/// in its metadata (to follow [`h2_open_stream_bytes`]' preface and
/// SETTINGS).
pub fn h2_headers_with_jwt(id: u32, jwt: &str) -> Vec<u8> {
    use base64::Engine;
    // The HEADERS frame of stream 1, from after the preface and SETTINGS,
    // with the credential header added to its block.
    let mut out = h2_open_stream_bytes()[24 + 9..].to_vec();
    out[5..9].copy_from_slice(&id.to_be_bytes());
    let name = node_agent::endpoint::credential::CREDENTIAL_HEADER;
    let value = base64::engine::general_purpose::STANDARD_NO_PAD.encode(jwt);
    out.push(0x00); // literal without indexing, new name
    hpack_int(&mut out, 0, 7, name.len());
    out.extend(name.as_bytes());
    hpack_int(&mut out, 0, 7, value.len());
    out.extend(value.as_bytes());
    let len = out.len() as u32 - 9;
    out[0..3].copy_from_slice(&len.to_be_bytes()[1..]);
    out
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits `flags`.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// One raw HTTP/2 frame read from a connection: its type, flags, stream and
/// payload.
pub struct RawFrame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads the next frame of a raw HTTP/2 connection.
pub async fn read_frame(socket: &mut tokio::net::UnixStream) -> std::io::Result<RawFrame> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    socket.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    socket.read_exact(&mut payload).await?;
    Ok(RawFrame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
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

//! The serving floor: the thinnest SDS server this stack allows, run as its
//! own process (`node-agent-bench --floor-server DIR`, hidden) so that its
//! CPU is read from `/proc` like the agent's.
//!
//! It is tonic on a Unix socket, on the same h2 (the workspace's
//! `[patch.crates-io]` gives the bench the agent's vendored h2), the same
//! tokio runtime and the HTTP/2 settings of the agent's server. Every
//! `SecretDiscoveryService` call is answered with bytes node-agent answered
//! the same request with, captured once before the run (see `floor`):
//! `FetchSecrets` with one response once its request has arrived;
//! `StreamSecrets` and `DeltaSecrets` with one response once their first
//! request has arrived, then nothing until the client ends the stream, as
//! the agent does. Requests are framed by tonic and dropped undecoded; the
//! responses go out through a codec that copies the encoded bytes (no
//! protobuf encoding); nothing is looked up.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use futures::Stream;
use prost::bytes::{Buf, BufMut, Bytes};
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::{ClientStreamingService, Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use crate::h2load::{DELTA, FETCH, STREAM};
use node_agent::config::SdsLimits;

/// The answers the floor serves, one per method: gRPC messages as
/// node-agent encoded them (without the 5-byte gRPC prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answers {
    pub fetch: Bytes,
    pub stream: Bytes,
    pub delta: Bytes,
}

impl Answers {
    const FILES: [&'static str; 3] = ["fetch.bin", "stream.bin", "delta.bin"];

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (name, bytes) in Self::FILES
            .iter()
            .zip([&self.fetch, &self.stream, &self.delta])
        {
            std::fs::write(dir.join(name), bytes)?;
        }
        Ok(())
    }

    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| -> anyhow::Result<Bytes> {
            let path = dir.join(name);
            Ok(std::fs::read(&path)
                .with_context(|| format!("read {}", path.display()))?
                .into())
        };
        Ok(Self {
            fetch: read(Self::FILES[0])?,
            stream: read(Self::FILES[1])?,
            delta: read(Self::FILES[2])?,
        })
    }

    /// The answer to a call of `path`.
    pub fn for_path(&self, path: &str) -> Option<&Bytes> {
        match path {
            FETCH => Some(&self.fetch),
            STREAM => Some(&self.stream),
            DELTA => Some(&self.delta),
            _ => None,
        }
    }
}

/// The socket the floor listens on, in its directory.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join("floor.sock")
}

/// The floor process: serves the answers in `dir` on `dir/floor.sock` until
/// its standard input closes (the harness holds it open, so a harness that
/// dies, however it dies, takes its floor with it).
pub fn main(dir: &Path) -> anyhow::Result<()> {
    let answers = Answers::read(dir)?;
    // The agent's runtime: tokio's multi-threaded default, a worker per core.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let path = socket(dir);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("bind {}", path.display()))?;
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        });
        serve(listener, answers, async {
            let _ = stdin_closed.await;
        })
        .await
    })
}

/// Serves `answers` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::UnixListener,
    answers: Answers,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    // The agent's own HTTP/2 settings, for the default bounds the harness's
    // agents keep.
    node_agent::endpoint::server::http2_server(&SdsLimits::default())
        .add_service(Floor(Arc::new(answers)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serve the floor")
}

/// The floor's one service: a method's answer, by path.
#[derive(Clone)]
struct Floor(Arc<Answers>);

impl NamedService for Floor {
    const NAME: &'static str = "envoy.service.secret.v3.SecretDiscoveryService";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tonic::codegen::Service<http::Request<Body>> for Floor {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let answers = self.0.clone();
        Box::pin(async move {
            let mut grpc = Grpc::new(FloorCodec);
            let path = req.uri().path();
            Ok(match answers.for_path(path) {
                Some(answer) if path == FETCH => {
                    grpc.client_streaming(Once(answer.clone()), req).await
                }
                Some(answer) => grpc.streaming(FirstOnly(answer.clone()), req).await,
                None => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// `FetchSecrets`: its answer once the request has arrived.
struct Once(Bytes);

impl ClientStreamingService<()> for Once {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Streaming<()>>) -> Self::Future {
        let answer = self.0.clone();
        Box::pin(async move {
            request.into_inner().message().await?;
            Ok(Response::new(answer))
        })
    }
}

/// A new `StreamSecrets` or `DeltaSecrets` stream: its answer once the
/// first request has arrived, then nothing until the client ends it.
struct FirstOnly(Bytes);

type Answering = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

impl StreamingService<()> for FirstOnly {
    type Response = Bytes;
    type ResponseStream = Answering;
    type Future = futures::future::Ready<Result<Response<Answering>, Status>>;

    fn call(&mut self, request: Request<Streaming<()>>) -> Self::Future {
        let answer = self.0.clone();
        let requests = request.into_inner();
        let answers = futures::stream::unfold((Some(requests), true), move |(requests, first)| {
            let answer = answer.clone();
            async move {
                let mut requests = requests?;
                if first {
                    return match requests.message().await {
                        Ok(Some(())) => Some((Ok(answer), (Some(requests), false))),
                        Ok(None) => None,
                        Err(e) => Some((Err(e), (None, false))),
                    };
                }
                // Later requests (ACKs) are read and go unanswered.
                while let Ok(Some(())) = requests.message().await {}
                None
            }
        });
        futures::future::ready(Ok(Response::new(Box::pin(answers) as Answering)))
    }
}

/// The floor's codec: requests dropped undecoded, responses copied as
/// they are.
struct FloorCodec;

impl Codec for FloorCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = BytesEncoder;
    type Decoder = DropDecoder;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> DropDecoder {
        DropDecoder
    }
}

/// The client's side of the capture: encoded messages out and in, as bytes.
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesEncoder;
    type Decoder = BytesDecoder;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> BytesDecoder {
        BytesDecoder
    }
}

/// The buffers of the agent's codec (src/endpoint/codec.rs).
fn buffers() -> BufferSettings {
    BufferSettings::new(2048, 32 * 1024)
}

pub struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

pub struct DropDecoder;

impl Decoder for DropDecoder {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        buf.advance(buf.remaining());
        Ok(Some(()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

pub struct BytesDecoder;

impl Decoder for BytesDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

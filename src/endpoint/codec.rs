//! The codec of every gRPC method the agent serves (SDS, the Workload API):
//! protobuf like tonic-prost's, except that a request that does not decode is
//! the client's error (`INVALID_ARGUMENT`), with small starting buffers and
//! responses capped at [`MAX_RESPONSE_BYTES`].

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use prost::bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tonic::metadata::MetadataValue;
use tonic::server::Grpc;
use tonic::Status;

/// Largest response the agent sends: a chain, a key and a root bundle are a
/// few KiB; this only catches a bug (or a CA answering megabytes of roots).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// tonic's server side of one method: responses encoded with the agent's
/// codec, at most [`MAX_RESPONSE_BYTES`] each.
pub(crate) fn grpc_for<E, D>() -> Grpc<GrpcCodec<E, D>>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    Grpc::new(GrpcCodec::<E, D>::default())
        .apply_max_message_size_config(None, Some(MAX_RESPONSE_BYTES))
}

/// Protobuf in and out, like tonic-prost's codec, except that a message that
/// does not decode is the client's error: `INVALID_ARGUMENT`, not `INTERNAL`.
/// Buffers start small: most messages are a few KiB, and every open
/// stream holds one of each.
pub struct GrpcCodec<E, D>(PhantomData<(E, D)>);

impl<E, D> Default for GrpcCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn buffers() -> BufferSettings {
    BufferSettings::new(2048, 32 * 1024)
}

impl<E, D> Codec for GrpcCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = MessageEncoder<E>;
    type Decoder = MessageDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        MessageEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

pub struct MessageEncoder<E>(PhantomData<E>);

impl<E: Message> Encoder for MessageEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("cannot encode the response: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

pub struct MessageDecoder<D>(PhantomData<D>);

impl<D: Message + Default> Decoder for MessageDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        decode_request(buf).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

/// Decodes one request message; a malformed one is `INVALID_ARGUMENT`.
pub fn decode_request<D: Message + Default>(buf: impl prost::bytes::Buf) -> Result<D, Status> {
    decode_message(buf).map_err(Status::invalid_argument)
}

/// Decodes one request message, or says why it is not one.
pub fn decode_message<D: Message + Default>(buf: impl prost::bytes::Buf) -> Result<D, String> {
    D::decode(buf).map_err(|e| {
        format!(
            "the request is not a valid protobuf {}: {e}",
            std::any::type_name::<D>()
                .rsplit("::")
                .next()
                .unwrap_or("message")
        )
    })
}

/// gRPC's message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// The response of a method answered once, as tonic's server codec sends
/// it: `content-type: application/grpc`, then the message, then
/// `grpc-status: 0` in the trailers. A message past [`MAX_RESPONSE_BYTES`]
/// is not sent: the trailers say `OUT_OF_RANGE`, in tonic's words.
pub fn once<M: Message>(msg: &M) -> http::Response<Body> {
    let len = msg.encoded_len();
    let (data, status) = if len > MAX_RESPONSE_BYTES {
        let status = Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: \
             {MAX_RESPONSE_BYTES} bytes"
        ));
        (None, status)
    } else {
        let mut buf = BytesMut::with_capacity(PREFIX + len);
        buf.put_u8(0);
        buf.put_u32(len as u32);
        msg.encode_raw(&mut buf);
        (Some(buf.freeze()), Status::ok(""))
    };
    let mut trailers = HeaderMap::new();
    let trailers = status.add_header(&mut trailers).ok().map(|()| trailers);
    let mut resp = http::Response::new(Body::new(Once { data, trailers }));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// Whether a request's messages are uncompressed (no `grpc-encoding`, or
/// `identity`); else tonic's refusal, as its server codec gives it.
pub fn identity_encoding(headers: &HeaderMap) -> Result<(), Status> {
    let Some(v) = headers.get("grpc-encoding") else {
        return Ok(());
    };
    if v.as_bytes() == b"identity" {
        return Ok(());
    }
    let other = match std::str::from_utf8(v.as_bytes()) {
        Ok(s) => s.to_string(),
        Err(_) => format!("{:?}", v.as_bytes()),
    };
    let mut status = Status::unimplemented(format!(
        "Content is compressed with `{other}` which isn't supported"
    ));
    status.metadata_mut().insert(
        "grpc-accept-encoding",
        MetadataValue::from_static("identity"),
    );
    Err(status)
}

/// The body of [`once`]: one message, then the trailers. Its size is not
/// told (as tonic's is not), so that no `content-length` is sent.
struct Once {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for Once {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;

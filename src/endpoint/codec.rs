//! gRPC's messages as every method the agent serves (SDS, the Workload API)
//! reads and sends them: protobuf like tonic-prost's, except that a request
//! that does not decode is the client's error (`INVALID_ARGUMENT`), and
//! responses are capped at [`MAX_RESPONSE_BYTES`]. What goes on the wire is
//! what tonic's server codec sends (its tests compare the two).

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use prost::bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tonic::metadata::MetadataValue;
use tonic::Status;

/// Largest response the agent sends: a chain, a key and a root bundle are a
/// few KiB; this only catches a bug (or a CA answering megabytes of roots).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

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

/// One response message as gRPC frames it: a prefix (not compressed, the
/// length), then the message. A message past [`MAX_RESPONSE_BYTES`] is not
/// framed: its status is `OUT_OF_RANGE`, in tonic's words.
pub fn frame<M: Message>(msg: &M) -> Result<Bytes, Status> {
    let len = msg.encoded_len();
    if len > MAX_RESPONSE_BYTES {
        return Err(Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: \
             {MAX_RESPONSE_BYTES} bytes"
        )));
    }
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    msg.encode_raw(&mut buf);
    Ok(buf.freeze())
}

/// The response of a method answered once, as tonic's server codec sends
/// it: `content-type: application/grpc`, then the message, then
/// `grpc-status: 0` in the trailers (or the status [`frame`] refused it
/// with, and no message).
pub fn once<M: Message>(msg: &M) -> http::Response<Body> {
    let (data, status) = match frame(msg) {
        Ok(data) => (Some(data), Status::ok("")),
        Err(status) => (None, status),
    };
    let mut trailers = HeaderMap::new();
    let trailers = status.add_header(&mut trailers).ok().map(|()| trailers);
    grpc_response(Body::new(Once { data, trailers }))
}

/// A gRPC response carrying `body`, with the headers tonic's server codec
/// sends.
pub fn grpc_response(body: Body) -> http::Response<Body> {
    let mut resp = http::Response::new(body);
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

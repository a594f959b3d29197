//! The codec of every gRPC method the agent serves (SDS, the Workload API):
//! protobuf like tonic-prost's, except that a request that does not decode is
//! the client's error (`INVALID_ARGUMENT`), with small starting buffers and
//! responses capped at [`MAX_RESPONSE_BYTES`].

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
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

//! The codec of the agent's gRPC methods (SDS and the Workload API):
//! protobuf like tonic-prost's, except that a request that does not decode is
//! the client's error (`INVALID_ARGUMENT`), with small starting buffers and
//! responses capped at [`MAX_RESPONSE_BYTES`].

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::Grpc;
use tonic::Status;

use super::server::MAX_RESPONSE_BYTES;

/// tonic's server side of one method: responses encoded with the agent's
/// codec, at most [`MAX_RESPONSE_BYTES`] each.
pub(crate) fn grpc_for<E, D>() -> Grpc<SdsCodec<E, D>>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    Grpc::new(SdsCodec::<E, D>::default())
        .apply_max_message_size_config(None, Some(MAX_RESPONSE_BYTES))
}

/// Protobuf in and out, like tonic-prost's codec, except that a message that
/// does not decode is the client's error: `INVALID_ARGUMENT`, not `INTERNAL`.
/// Buffers start small: most SDS messages are a few KiB, and every open
/// stream holds one of each.
pub struct SdsCodec<E, D>(PhantomData<(E, D)>);

impl<E, D> Default for SdsCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn buffers() -> BufferSettings {
    BufferSettings::new(2048, 32 * 1024)
}

impl<E, D> Codec for SdsCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = SdsEncoder<E>;
    type Decoder = SdsDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        SdsEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        SdsDecoder(PhantomData)
    }
}

pub struct SdsEncoder<E>(PhantomData<E>);

impl<E: Message> Encoder for SdsEncoder<E> {
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

pub struct SdsDecoder<D>(PhantomData<D>);

impl<D: Message + Default> Decoder for SdsDecoder<D> {
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
    D::decode(buf).map_err(|e| {
        Status::invalid_argument(format!(
            "the request is not a valid protobuf {}: {e}",
            std::any::type_name::<D>()
                .rsplit("::")
                .next()
                .unwrap_or("message")
        ))
    })
}

//! Tests of the request reader's dropped field (src/endpoint/framing.rs): a
//! field the message type does not read (Envoy's `node` in SDS requests) is
//! dropped as it arrives, never buffered, and what is decoded is what
//! decoding the whole message would give.

use super::*;
use crate::sds::request::RequestWithoutNode;
use envoy_types::pb::envoy::config::core::v3::{Extension, Node};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use http_body::Frame;
use proptest::prelude::*;

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0];
    v.extend((body.len() as u32).to_be_bytes());
    v.extend(body);
    v
}

fn envoy_request(extensions: usize) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: "v1".into(),
        node: Some(Node {
            id: "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local".into(),
            extensions: (0..extensions)
                .map(|i| Extension {
                    name: format!("envoy.filters.http.example_{i}"),
                    category: "envoy.filters.http".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        response_nonce: "n-1".into(),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_node_is_never_buffered() {
    let full = envoy_request(1100);
    let bytes = framed(&full.encode_to_vec());
    assert!(bytes.len() > 50_000, "{}", bytes.len());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(64);
    let body = Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let budget = Arc::new(Semaphore::new(1 << 20));
    let mut r = RequestReader::new(body, budget.clone(), 1 << 20, Duration::from_secs(5));
    // All but the last 100 bytes, in HTTP/2-sized frames.
    let (most, rest) = bytes.split_at(bytes.len() - 100);
    for c in most.chunks(16 * 1024) {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(c))))
            .await
            .unwrap();
    }
    let waiting =
        tokio::time::timeout(Duration::from_millis(10), r.message::<RequestWithoutNode>()).await;
    assert!(waiting.is_err(), "the message is not complete yet");
    assert!(
        r.msg.kept.capacity() < 256,
        "{} bytes held for a message whose only large field is dropped",
        r.msg.kept.capacity()
    );
    assert_eq!(
        budget.available_permits(),
        (1 << 20) - bytes.len(),
        "the budget is the whole message's until it is read"
    );
    tx.send(Ok(Frame::data(Bytes::copy_from_slice(rest))))
        .await
        .unwrap();
    let got: DiscoveryRequest = r
        .message::<RequestWithoutNode>()
        .await
        .unwrap()
        .unwrap()
        .into();
    assert_eq!(got, DiscoveryRequest { node: None, ..full });
    assert_eq!(budget.available_permits(), 1 << 20);
}

/// Reads every message of `chunks` as `RequestWithoutNode`.
fn read_all(chunks: Vec<Vec<u8>>) -> Vec<Result<Option<RequestWithoutNode>, FramingError>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let frames: Vec<Result<Frame<Bytes>, Status>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from(c))))
            .collect();
        let body = Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let budget = Arc::new(Semaphore::new(1 << 20));
        let mut r = RequestReader::new(body, budget.clone(), 1 << 16, Duration::from_secs(5));
        let mut out = Vec::new();
        loop {
            let m = r.message::<RequestWithoutNode>().await;
            let done = !matches!(m, Ok(Some(_)));
            out.push(m);
            if done {
                break;
            }
        }
        drop(r);
        assert_eq!(budget.available_permits(), 1 << 20, "budget given back");
        out
    })
}

/// How many bytes of `body` a reader keeps while reading it in chunks of
/// `split` bytes, the node dropped.
fn kept_len(body: &[u8], split: usize) -> usize {
    let mut msg = Partial::default();
    for c in framed(body).chunks(split) {
        let mut c = Bytes::copy_from_slice(c);
        while !c.is_empty() {
            msg.read(&mut c, RequestWithoutNode::DROPPED_FIELD, 1 << 20)
                .unwrap();
        }
    }
    assert!(msg.complete());
    msg.kept.len()
}

/// What reading `body` must give: what decoding it whole gives.
fn check_as_decoded(body: &[u8], split: usize) -> Result<(), TestCaseError> {
    let chunks: Vec<Vec<u8>> = framed(body).chunks(split).map(<[u8]>::to_vec).collect();
    let out = read_all(chunks);
    match RequestWithoutNode::decode(body) {
        Ok(want) => {
            prop_assert_eq!(out.len(), 2);
            prop_assert_eq!(out[0].as_ref().unwrap().as_ref(), Some(&want));
        }
        Err(_) => {
            prop_assert_eq!(out.len(), 1);
            let e = out[0].as_ref().unwrap_err();
            prop_assert_eq!(e.code(), Code::InvalidArgument, "{:?}", e);
        }
    }
    Ok(())
}

proptest! {
    /// Arbitrary bytes: read with the node dropped, they give what
    /// decoding them whole gives, or INVALID_ARGUMENT where it fails.
    #[test]
    fn arbitrary_bodies_read_as_they_decode(
        body in prop::collection::vec(any::<u8>(), 0..400),
        split in 1usize..64,
    ) {
        check_as_decoded(&body, split)?;
    }

    /// Envoy's requests, with the node anywhere among the fields and
    /// fields of every wire type the agent does not know around it, one
    /// byte of them changed or not: as decoding them whole gives.
    #[test]
    fn requests_with_a_node_read_as_they_decode(
        extensions in 0usize..40,
        names in prop::collection::vec("[a-z]{0,12}", 0..4),
        node_last in any::<bool>(),
        unknown in prop::collection::vec((7u32..3000, 0u8..4, any::<u64>()), 0..4),
        flip in any::<Option<(usize, u8)>>(),
        split in 1usize..300,
    ) {
        let mut full = envoy_request(extensions);
        full.resource_names = names;
        let node_len = DiscoveryRequest { node: full.node.clone(), ..Default::default() }.encoded_len();
        let body = if node_last {
            // prost writes fields in tag order; a node after the others is
            // just as valid.
            let node = DiscoveryRequest { node: full.node.take(), ..Default::default() };
            let mut b = full.encode_to_vec();
            b.extend(node.encode_to_vec());
            b
        } else {
            full.encode_to_vec()
        };
        // Unknown fields before all the others and after them.
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for (i, (tag, wire, value)) in unknown.into_iter().enumerate() {
            let fields = if i % 2 == 0 { &mut before } else { &mut after };
            use prost::encoding::{encode_key, encode_varint, WireType};
            match wire {
                0 => {
                    encode_key(tag, WireType::Varint, fields);
                    encode_varint(value, fields);
                }
                1 => {
                    encode_key(tag, WireType::SixtyFourBit, fields);
                    fields.extend(value.to_le_bytes());
                }
                2 => {
                    encode_key(tag, WireType::LengthDelimited, fields);
                    let len = (value % 40) as usize;
                    encode_varint(len as u64, fields);
                    fields.extend(std::iter::repeat_n(0x12, len));
                }
                _ => {
                    encode_key(tag, WireType::ThirtyTwoBit, fields);
                    fields.extend((value as u32).to_le_bytes());
                }
            }
        }
        let mut body = [before, body, after].concat();
        if flip.is_none() {
            prop_assert_eq!(kept_len(&body, split), body.len() - node_len, "all but the node kept");
        }
        if let Some((at, byte)) = flip {
            let at = at % body.len().max(1);
            if let Some(b) = body.get_mut(at) {
                *b = byte;
            }
        }
        check_as_decoded(&body, split)?;
    }
}

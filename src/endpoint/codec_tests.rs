//! A method answered once is sent as tonic's server codec sends it.

use http_body_util::BodyExt;

use super::*;

/// tonic's own server side of one method, to compare with.
fn tonic_grpc(
) -> tonic::server::Grpc<tonic_prost::ProstCodec<prost_types::Duration, prost_types::Duration>> {
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
}

/// The frames of a response body: its data, then its trailers.
async fn frames(resp: http::Response<Body>) -> (Vec<u8>, HeaderMap) {
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    (collected.to_bytes().to_vec(), trailers)
}

/// What tonic's codec sends for `msg`, answered by a client-streaming
/// method: its headers, data and trailers.
async fn tonic_once(msg: prost_types::Duration) -> (HeaderMap, Vec<u8>, HeaderMap) {
    struct Answer(Option<prost_types::Duration>);
    impl tonic::server::ClientStreamingService<prost_types::Duration> for Answer {
        type Response = prost_types::Duration;
        type Future =
            futures::future::Ready<Result<tonic::Response<prost_types::Duration>, Status>>;
        fn call(
            &mut self,
            _: tonic::Request<tonic::Streaming<prost_types::Duration>>,
        ) -> Self::Future {
            futures::future::ready(Ok(tonic::Response::new(self.0.take().unwrap())))
        }
    }
    let resp = tonic_grpc()
        .client_streaming(Answer(Some(msg)), http::Request::new(Body::empty()))
        .await;
    let headers = resp.headers().clone();
    let (data, trailers) = frames(resp).await;
    (headers, data, trailers)
}

#[tokio::test]
async fn a_message_as_tonic_sends_it() {
    let msg = prost_types::Duration {
        seconds: 12345,
        nanos: 678,
    };
    let resp = once(&msg);
    let headers = resp.headers().clone();
    let (data, trailers) = frames(resp).await;
    assert_eq!((headers, data.clone(), trailers), tonic_once(msg).await);
    assert_eq!(data[0], 0, "not compressed");
    assert_eq!(
        u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize,
        msg.encoded_len()
    );
    assert_eq!(prost_types::Duration::decode(&data[5..]).unwrap(), msg);
}

#[tokio::test]
async fn a_message_past_the_limit_is_not_sent() {
    let big = prost_types::Any {
        type_url: String::new(),
        value: vec![7; MAX_RESPONSE_BYTES],
    };
    let (data, trailers) = frames(once(&big)).await;
    assert!(data.is_empty());
    let status = Status::from_header_map(&trailers).unwrap();
    assert_eq!(status.code(), tonic::Code::OutOfRange);
    assert!(
        status
            .message()
            .starts_with("Error, encoded message length too large"),
        "{}",
        status.message()
    );
}

#[test]
fn compressed_requests_are_refused_as_tonic_refuses_them() {
    let mut h = HeaderMap::new();
    assert!(identity_encoding(&h).is_ok());
    h.insert("grpc-encoding", HeaderValue::from_static("identity"));
    assert!(identity_encoding(&h).is_ok());
    h.insert("grpc-encoding", HeaderValue::from_static("gzip"));
    let status = identity_encoding(&h).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(
        status.message(),
        "Content is compressed with `gzip` which isn't supported"
    );
    assert_eq!(
        status.metadata().get("grpc-accept-encoding").unwrap(),
        "identity"
    );
    // The same as tonic's own codec.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut req = http::Request::new(Body::empty());
    req.headers_mut()
        .insert("grpc-encoding", HeaderValue::from_static("gzip"));
    struct Never;
    impl tonic::server::ClientStreamingService<prost_types::Duration> for Never {
        type Response = prost_types::Duration;
        type Future =
            futures::future::Pending<Result<tonic::Response<prost_types::Duration>, Status>>;
        fn call(
            &mut self,
            _: tonic::Request<tonic::Streaming<prost_types::Duration>>,
        ) -> Self::Future {
            futures::future::pending()
        }
    }
    let resp = rt.block_on(tonic_grpc().client_streaming(Never, req));
    assert_eq!(
        resp.headers(),
        &status.into_http::<Body>().headers().clone()
    );
}

//! A stream's responses are sent as tonic's server codec sends them, and
//! the stream's loop lives exactly as long as its body.

use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::codegen::http;

use super::*;
use crate::endpoint::server::answer_stream;

type Msg = prost_types::Duration;

fn msg(seconds: i64) -> Msg {
    Msg { seconds, nanos: 7 }
}

/// A response's headers, data and trailers.
async fn collect(resp: http::Response<Body>) -> (HeaderMap, Vec<u8>, HeaderMap) {
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    (headers, collected.to_bytes().to_vec(), trailers)
}

/// What tonic's server codec sends for a server-streaming method whose
/// stream yields `items`.
async fn tonic_sends(items: Vec<Result<Msg, Status>>) -> (HeaderMap, Vec<u8>, HeaderMap) {
    type Items = futures::stream::Iter<std::vec::IntoIter<Result<Msg, Status>>>;
    struct Method(Option<Vec<Result<Msg, Status>>>);
    impl tonic::server::StreamingService<Msg> for Method {
        type Response = Msg;
        type ResponseStream = Items;
        type Future = futures::future::Ready<Result<tonic::Response<Items>, Status>>;
        fn call(&mut self, _: tonic::Request<tonic::Streaming<Msg>>) -> Self::Future {
            let items = self.0.take().unwrap();
            futures::future::ready(Ok(tonic::Response::new(futures::stream::iter(items))))
        }
    }
    let resp = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Msg, Msg>::default())
        .streaming(Method(Some(items)), http::Request::new(Body::empty()))
        .await;
    collect(resp).await
}

/// What the agent sends when its stream's loop hands over `items`, one at
/// a time, then ends.
async fn agent_sends(items: Vec<Result<Msg, Status>>) -> (HeaderMap, Vec<u8>, HeaderMap) {
    let resp = answer_stream(http::Request::new(Body::empty()), |_| {
        let (tx, rx) = channel();
        let run: Loop = Box::pin(async move {
            for item in items {
                tx.send(Box::new(item)).await;
            }
        });
        StreamBody::new(run, rx)
    });
    collect(resp).await
}

#[tokio::test]
async fn messages_then_ok_as_tonic_sends_them() {
    let items = || vec![Ok(msg(1)), Ok(msg(22)), Ok(msg(333))];
    let agent = agent_sends(items()).await;
    assert_eq!(agent, tonic_sends(items()).await);
    // Three messages, each behind its prefix, and grpc-status 0.
    let lens: usize = items()
        .iter()
        .map(|m| m.as_ref().unwrap().encoded_len())
        .sum();
    assert_eq!(agent.1.len(), 3 * 5 + lens);
    assert_eq!(agent.2.get("grpc-status").unwrap(), "0");
}

#[tokio::test]
async fn an_error_ends_the_stream_with_its_status_as_tonic_sends_it() {
    let items = || vec![Ok(msg(1)), Err(Status::permission_denied("no: not yours"))];
    let agent = agent_sends(items()).await;
    assert_eq!(agent, tonic_sends(items()).await);
    let status = Status::from_header_map(&agent.2).unwrap();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // Whatever the loop hands over after an error is not sent.
    let mut more = items();
    more.push(Ok(msg(2)));
    assert_eq!(agent_sends(more).await, agent);
}

#[tokio::test]
async fn no_message_then_ok_as_tonic_sends_it() {
    assert_eq!(agent_sends(vec![]).await, tonic_sends(vec![]).await);
}

#[tokio::test]
async fn the_loop_lives_as_long_as_the_body() {
    let (tx, rx) = channel::<Msg>();
    let (held, mut released) = tokio::sync::oneshot::channel::<()>();
    let run: Loop = Box::pin(async move {
        let _held = held;
        tx.send(Box::new(Ok(msg(1)))).await;
        std::future::pending::<()>().await;
    });
    let mut body = StreamBody::new(run, rx);
    let first = body.frame().await.unwrap().unwrap();
    assert!(
        first.is_data(),
        "the loop ran in the body and its message came"
    );
    // The loop waits; it is alive while the body is.
    let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), body.frame()).await;
    assert!(waiting.is_err(), "nothing more was sent");
    assert_eq!(
        released.try_recv(),
        Err(tokio::sync::oneshot::error::TryRecvError::Empty),
        "the loop is alive"
    );
    drop(body);
    assert_eq!(
        released.try_recv(),
        Err(tokio::sync::oneshot::error::TryRecvError::Closed),
        "the loop was dropped with the body"
    );
}

#[test]
fn a_compressed_request_is_refused_before_the_stream_opens() {
    let mut req = http::Request::new(Body::empty());
    req.headers_mut()
        .insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
    let resp = answer_stream::<Msg>(req, |_| unreachable!("the stream must not open"));
    let status = Status::from_header_map(resp.headers()).unwrap();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}

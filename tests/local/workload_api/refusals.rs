//! What the Workload API refuses, and how: calls without the security header,
//! or to an agent without a token file; and the bounds it shares with the SDS
//! socket or has of its own, each refusal naming its setting (tested with raw
//! FetchX509SVID calls).

use crate::support;

use std::time::Duration;

use node_agent::workload_api::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use node_agent::workload_api::pb::{X509BundlesRequest, X509svidRequest};
use prost::Message;
use spiffe::{WorkloadApiClient, WorkloadApiError};
use support::agent::Agent;
use support::sds_client::{self, fake_jwt};
use tokio_stream::StreamExt;

use super::{api_agent, endpoint, SPIFFE_ID};

#[tokio::test]
async fn calls_without_the_header_or_without_a_token_file_are_refused() {
    let a = api_agent(true, &[]);

    // The spiffe crate always adds the header, so a plain gRPC client
    // (generated from the same proto) calls without it.
    let path = a.api_socket.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let err = raw
        .fetch_x509svid(X509svidRequest {})
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    // Positive control: the same client with the header is served.
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut s = raw.fetch_x509svid(req).await.unwrap().into_inner();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, SPIFFE_ID);
    // Bundles are keyed by the trust domain's SPIFFE ID, as the spec says.
    let mut req = tonic::Request::new(X509BundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut s = raw.fetch_x509_bundles(req).await.unwrap().into_inner();
    let bundles = s.next().await.unwrap().unwrap().bundles;
    assert_eq!(
        bundles.keys().collect::<Vec<_>>(),
        ["spiffe://cluster.local"]
    );
    assert_eq!(bundles["spiffe://cluster.local"], first.svids[0].bundle);

    // Without WORKLOAD_TOKEN_PATH every X.509 call is PERMISSION_DENIED.
    let node = api_agent(false, &[]);
    let client = WorkloadApiClient::connect_to(endpoint(&node.api_socket))
        .await
        .unwrap();
    for err in [
        client.fetch_x509_svid().await.map(|_| ()).unwrap_err(),
        client.fetch_x509_bundles().await.map(|_| ()).unwrap_err(),
    ] {
        match &err {
            WorkloadApiError::PermissionDenied(msg) => {
                assert!(msg.contains("node-wide attestation"), "{msg}");
                assert!(msg.contains("WORKLOAD_TOKEN_PATH"), "{msg}");
            }
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }
    assert!(
        node.agent
            .log()
            .contains("every Workload API call will be refused"),
        "{}",
        node.agent.log()
    );
}

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

/// A raw FetchX509SVID call with the security header, whose request
/// messages are whatever goes into the returned sender (none, for a silent
/// client); the call's first answer comes out of the receiver.
async fn raw_svid_call(
    channel: tonic::transport::Channel,
) -> (
    tokio::sync::mpsc::Sender<Vec<u8>>,
    Result<tonic::Streaming<Vec<u8>>, tonic::Status>,
) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let resp = grpc
        .streaming(
            req,
            tonic::codegen::http::uri::PathAndQuery::from_static(FETCH_X509_SVID),
            support::attack::RawCodec,
        )
        .await
        .map(tonic::Response::into_inner);
    (tx, resp)
}

/// The first thing a raw call answers: a message or its status.
async fn first_answer(
    resp: Result<tonic::Streaming<Vec<u8>>, tonic::Status>,
    agent: &Agent,
) -> (
    Result<Vec<u8>, tonic::Status>,
    Option<tonic::Streaming<Vec<u8>>>,
) {
    let mut inbound = match resp {
        Ok(inbound) => inbound,
        Err(status) => return (Err(status), None),
    };
    match tokio::time::timeout(Duration::from_secs(20), inbound.next()).await {
        Ok(Some(item)) => (item, Some(inbound)),
        Ok(None) => panic!("the stream ended without a status\n{}", agent.log()),
        Err(_) => panic!("no answer within 20s\n{}", agent.log()),
    }
}

/// The status a raw call is refused with (a panic, without the message's
/// bytes, which hold a key, if it is served).
async fn refusal(
    resp: Result<tonic::Streaming<Vec<u8>>, tonic::Status>,
    agent: &Agent,
) -> tonic::Status {
    match first_answer(resp, agent).await.0 {
        Err(status) => status,
        Ok(m) => panic!("served ({} bytes)\n{}", m.len(), agent.log()),
    }
}

/// The Workload API is bounded as the SDS socket is, by the same settings
/// (a silent client: SDS_FIRST_REQUEST_TIMEOUT; a large request:
/// SDS_MAX_REQUEST_BYTES), and by its own caps, WORKLOAD_API_MAX_STREAMS
/// and WORKLOAD_API_MAX_CONNECTIONS, which keep it from taking the SDS
/// socket's places: each refusal names its setting, places are given back,
/// and the SDS socket is served throughout.
#[tokio::test]
async fn workload_api_bounds_refuse_naming_the_setting() {
    let a = api_agent(
        true,
        &[
            ("WORKLOAD_API_MAX_STREAMS", "2".into()),
            ("WORKLOAD_API_MAX_CONNECTIONS", "2".into()),
            ("SDS_FIRST_REQUEST_TIMEOUT", "1s".into()),
            ("SDS_MAX_REQUEST_BYTES", "16KiB".into()),
        ],
    );
    let agent = &a.agent;
    let one = support::attack::raw_channel(&a.api_socket).await;

    // A client that sends nothing is closed after SDS_FIRST_REQUEST_TIMEOUT.
    let (_silent, resp) = raw_svid_call(one.clone()).await;
    let e = refusal(resp, agent).await;
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("SDS_FIRST_REQUEST_TIMEOUT=1s"),
        "{e:?}"
    );

    // A request over SDS_MAX_REQUEST_BYTES is refused from its header.
    let (tx, resp) = raw_svid_call(one.clone()).await;
    tx.send(vec![0; 20 << 10]).await.unwrap();
    let e = refusal(resp, agent).await;
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("more than SDS_MAX_REQUEST_BYTES=16384"),
        "{e:?}"
    );

    // WORKLOAD_API_MAX_STREAMS: two streams are served (the empty
    // X509SVIDRequest), a third is refused.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, resp) = raw_svid_call(one.clone()).await;
        tx.send(Vec::new()).await.unwrap();
        let (first, inbound) = first_answer(resp, agent).await;
        let svid = node_agent::workload_api::pb::X509svidResponse::decode(
            first.expect("served within the cap").as_slice(),
        )
        .unwrap();
        assert_eq!(svid.svids[0].spiffe_id, SPIFFE_ID);
        held.push((tx, inbound));
    }
    let two = support::attack::raw_channel(&a.api_socket).await;
    let (tx, resp) = raw_svid_call(two.clone()).await;
    let _ = tx.send(Vec::new()).await;
    let e = refusal(resp, agent).await;
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("WORKLOAD_API_MAX_STREAMS=2"), "{e:?}");

    // WORKLOAD_API_MAX_CONNECTIONS: with two connections open (the second
    // answered above), a third is closed at once...
    use tokio::io::AsyncReadExt;
    let mut third = tokio::net::UnixStream::connect(&a.api_socket)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed at once, not left hanging");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // ...while the SDS socket, which shares SDS_MAX_* with the Workload
    // API, is served.
    let mut sds = sds_client::connect(&agent.socket).await;
    let resp = sds_client::fetch(&mut sds, &["default"], &fake_jwt("default", "httpbin"))
        .await
        .unwrap_or_else(|e| panic!("SDS refused: {e:?}\n{}", agent.log()));
    assert_eq!(sds_client::served_uris(&resp), [SPIFFE_ID]);

    // Places are given back: once a stream ends, a new one is served.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (tx, resp) = raw_svid_call(two.clone()).await;
        let _ = tx.send(Vec::new()).await;
        match first_answer(resp, agent).await.0 {
            Ok(_) => break,
            Err(e)
                if e.code() == tonic::Code::ResourceExhausted
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the place was not given back: {e:?}\n{}", agent.log()),
        }
    }
    let log = agent.log();
    for limit in ["WORKLOAD_API_MAX_STREAMS", "WORKLOAD_API_MAX_CONNECTIONS"] {
        assert!(
            log.contains(&format!("limit={limit}")),
            "no warning for {limit}\n{log}"
        );
    }
}

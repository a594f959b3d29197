//! Which credential a request is served for: an expired JWT is refused before
//! any cache lookup; a missing or unparsable JWT and unknown resource names are
//! refused with the status that says why (and logged), Istio 1.1's header and
//! `authorization: Bearer` are accepted; and in token-file mode the file is
//! read fresh for every request.

use crate::support;

use support::agent::Agent;
use support::sds_client::fake_jwt;
use support::sds_client::*;
use tokio_stream::StreamExt;
use tonic::Code;

use super::local_agent;

/// An expired JWT is refused at the edge, before any cache lookup: even when
/// its identity's certificate is cached.
#[tokio::test]
async fn an_expired_jwt_is_refused_even_when_its_identity_is_cached() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    fetch(&mut client, &["default"], &fake_jwt("exp", "ired"))
        .await
        .expect("the identity is served and cached");
    let expired = jwt_with(r#"{"sub":"system:serviceaccount:exp:ired","exp":1000}"#);
    let err = fetch(&mut client, &["default"], &expired)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());
    let (tx, mut inbound) = open_stream(&mut client, &expired).await;
    tx.send(request(&["ROOTCA"], None)).await.unwrap();
    let err = inbound.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        agent.log().matches("issued workload certificate").count(),
        1
    );
}

fn jwt_with(payload: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
        URL_SAFE_NO_PAD.encode(payload)
    )
}

#[tokio::test]
async fn credentials_and_resource_names_are_checked() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;

    // Unknown name: InvalidArgument listing what is served.
    let err = fetch(&mut client, &["default", "bogus"], &fake_jwt("a", "b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("bogus") && err.message().contains("default, ROOTCA"),
        "{}",
        err.message()
    );

    // No credential: Unauthenticated naming the header.
    let err = client
        .fetch_secrets(tonic::Request::new(request(&["default"], None)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("istio_sds_credentials_header-bin"),
        "{}",
        err.message()
    );

    // A JWT that does not parse.
    let err = fetch(&mut client, &["default"], "garbage")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("not a JWT"), "{}", err.message());

    // The same on a stream.
    let (tx, mut inbound) = open_stream(&mut client, "x.y.z").await;
    tx.send(request(&["default"], None)).await.unwrap();
    let err = inbound.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Istio 1.1's header spelling and authorization: Bearer both work.
    let mut req = tonic::Request::new(request(&["default"], None));
    req.metadata_mut().insert_bin(
        "istio_sds_credentail_header-bin",
        tonic::metadata::MetadataValue::from_bytes(fake_jwt("old", "spelling").as_bytes()),
    );
    let resp = client.fetch_secrets(req).await.unwrap().into_inner();
    assert_eq!(
        served_uris(&resp),
        ["spiffe://cluster.local/ns/old/sa/spelling"]
    );
    let mut req = tonic::Request::new(request(&["ROOTCA"], None));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", fake_jwt("bear", "er"))
            .parse()
            .unwrap(),
    );
    client.fetch_secrets(req).await.unwrap();

    // Every refusal was logged.
    let log = agent.log();
    assert!(
        log.contains("refusing FetchSecrets: unknown resource name"),
        "{log}"
    );
    assert!(
        log.contains("refusing FetchSecrets: no credential"),
        "{log}"
    );
    assert!(
        log.contains("refusing SDS request: invalid credential"),
        "{log}"
    );
}

#[tokio::test]
async fn token_file_mode_reads_the_file_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, fake_jwt("podns", "podsa")).unwrap();
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("WORKLOAD_TOKEN_PATH", token.display().to_string()),
    ]);
    let mut client = connect(&agent.socket).await;
    let resp = client
        .fetch_secrets(tonic::Request::new(request(&["default"], None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        served_uris(&resp),
        ["spiffe://cluster.local/ns/podns/sa/podsa"]
    );
    std::fs::write(&token, fake_jwt("podns", "rotated")).unwrap();
    let resp = client
        .fetch_secrets(tonic::Request::new(request(&["default"], None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        served_uris(&resp),
        ["spiffe://cluster.local/ns/podns/sa/rotated"]
    );
    // The development-CA warning was given.
    assert!(
        agent.log().contains("for development only"),
        "{}",
        agent.log()
    );
}

//! Requests refused with the status that says why, and logged: an unknown
//! resource name, no credential, a credential that is not a JWT, a type that
//! is not a secret's; and the other spellings of the credential accepted:
//! Istio 1.1's header and `authorization: Bearer`.

use super::*;

#[tokio::test(start_paused = true)]
async fn credentials_and_resource_names_are_checked() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;

    // Unknown name: INVALID_ARGUMENT listing what is served.
    let err = fetch(&mut client, &["default", "bogus"], &jwt("x", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("bogus") && err.message().contains("default, ROOTCA"),
        "{}",
        err.message()
    );

    // No credential: UNAUTHENTICATED naming the header.
    let err = client
        .fetch_secrets(tonic::Request::new(request(&["default"], None)))
        .await
        .unwrap_err();
    assert!(
        is(
            &err,
            Code::Unauthenticated,
            "istio_sds_credentials_header-bin"
        ),
        "{err:?}"
    );

    // A credential that is not a JWT.
    let err = fetch(&mut client, &["default"], &Credential::new("garbage"))
        .await
        .unwrap_err();
    assert!(is(&err, Code::Unauthenticated, "not a JWT"), "{err:?}");

    // The same on a stream.
    let mut s = open_sotw(&mut client, &Credential::new("x.y.z"))
        .await
        .unwrap();
    s.send(request(&["default"], None)).await;
    assert_eq!(s.status().await.code(), Code::Unauthenticated);

    // Istio 1.1's header spelling and `authorization: Bearer` both carry it.
    let mut req = tonic::Request::new(request(&["default"], None));
    req.metadata_mut().insert_bin(
        "istio_sds_credentail_header-bin",
        tonic::metadata::MetadataValue::from_bytes(jwt("spelling", None).expose().as_bytes()),
    );
    let resp = client.fetch_secrets(req).await.unwrap().into_inner();
    assert_eq!(served_uris(&resp), ["spiffe://td/ns/ns/sa/spelling"]);
    let mut req = tonic::Request::new(request(&["ROOTCA"], None));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", jwt("bearer", None).expose())
            .parse()
            .unwrap(),
    );
    client.fetch_secrets(req).await.unwrap();

    // Every refusal was logged.
    let log = agent.log();
    for line in [
        "refusing FetchSecrets: unknown resource name",
        "refusing FetchSecrets: no credential",
        "refusing SDS request: invalid credential",
    ] {
        assert!(log.contains(line), "{line:?} not in\n{log}");
    }
}

#[tokio::test(start_paused = true)]
async fn delta_refusals_carry_the_documented_status() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);

    let mut s = open_delta_with(&mut client, None).await.unwrap();
    s.send(delta_request(&["default"], "")).await;
    let err = s.status().await;
    assert!(
        is(&err, Code::Unauthenticated, "WORKLOAD_TOKEN_PATH"),
        "{err:?}"
    );

    let mut s = open_delta(&mut client, &x).await.unwrap();
    s.send(DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..delta_request(&["default"], "")
    })
    .await;
    assert_eq!(s.status().await.code(), Code::InvalidArgument);

    // Positive control on the same connection: a valid stream is served.
    let mut s = open_delta(&mut client, &x).await.unwrap();
    s.send(delta_request(&["default"], "")).await;
    assert_eq!(delta_names(&s.response().await), ["default"]);
}

//! Token-file mode (`WORKLOAD_TOKEN_PATH`): a request carrying no credential
//! is served for the JWT in the file, read fresh for every request.

use crate::support;

use support::agent::Agent;
use support::sds_client::fake_jwt;
use support::sds_client::*;

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

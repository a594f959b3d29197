//! The SDS server seen from a Rust gRPC client: FetchSecrets, the stream state
//! machine (ACK, NACK, stale nonce), credentials and socket lifecycle.

use crate::support;

use std::time::Duration;

use support::agent::Agent;
use support::sds_client::fake_jwt;
use support::sds_client::*;
use tokio_stream::StreamExt;
use tonic::Code;

fn local_agent() -> Agent {
    Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "1h".into()),
    ])
}

#[tokio::test]
async fn fetch_secrets_returns_the_workload_certificate_and_root() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "httpbin");
    let resp = fetch(&mut client, &["default", "ROOTCA"], &jwt)
        .await
        .expect("FetchSecrets succeeds");
    assert_eq!(resp.type_url, SECRET_TYPE);
    assert!(!resp.version_info.is_empty() && !resp.nonce.is_empty());
    let got = secrets(&resp);
    assert_eq!(
        got.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["default", "ROOTCA"]
    );
    let (chain, key) = tls_certificate(&got[0]);
    let (uris, _) = leaf_facts(&chain);
    assert_eq!(uris, ["spiffe://cluster.local/ns/default/sa/httpbin"]);
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 key");
    let root = trusted_ca(&got[1]);
    assert!(root.contains("BEGIN CERTIFICATE"));

    // A second fetch is served from the cache: same certificate, same key.
    let again = fetch(&mut client, &["default"], &jwt).await.unwrap();
    assert_eq!(
        tls_certificate(&secrets(&again)[0]),
        (chain.clone(), key.clone())
    );

    // The key never reaches the log: not its secret part (the first 40
    // characters of a PKCS#8 PEM body are a header every key shares).
    let log = agent.log();
    let (secret_b64, secret_hex) = ec_p256_secret(&key);
    for piece in &secret_b64 {
        assert!(!log.contains(piece), "private key material in the log");
    }
    assert!(
        !log.to_ascii_lowercase().contains(&secret_hex),
        "private key scalar (hex) in the log"
    );
    assert!(!log.contains(&jwt), "JWT in the log");
}

/// The parts of an EC P-256 PKCS#8 PEM key unique to it: the base64 of its
/// private scalar (which follows a 36-byte header every such key shares), in
/// the two pieces the PEM's line break leaves, and the scalar in hex.
fn ec_p256_secret(pem: &str) -> (Vec<String>, String) {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(&body)
        .unwrap();
    assert_eq!(der.len(), 138, "an EC P-256 PKCS#8 key");
    let scalar = &der[36..68];
    // Base64 characters 48..88 encode bytes 36..66, scalar bytes only; a
    // PEM line holds 64 characters.
    let b64 = vec![body[48..64].to_string(), body[64..88].to_string()];
    let hex = scalar.iter().map(|b| format!("{b:02x}")).collect();
    (b64, hex)
}

/// The resource names of a response, in order.
fn names_of(
    resp: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<String> {
    secrets(resp).into_iter().map(|s| s.name).collect()
}

/// The next response on a stream (a bounded wait, so a hang fails the test).
async fn next(
    inbound: &mut tonic::Streaming<
        envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
    >,
    what: &str,
    agent: &Agent,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
    next_within(inbound, Duration::from_secs(10), what, || agent.log())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", agent.log()))
}

fn nack(
    names: &[&str],
    of: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
    let mut nack = request(names, Some(of));
    nack.error_detail = Some(envoy_types::pb::google::rpc::Status {
        code: 3,
        message: "Failed to load certificate chain from <inline>".into(),
        ..Default::default()
    });
    nack
}

/// Requests on a stream are read in order, so a message that must get no
/// reply is followed by one that must: the next response answering the
/// second proves the first was read and left unanswered, without waiting
/// for "nothing".
#[tokio::test]
async fn stream_state_machine_acks_nacks_and_stale_nonces() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("ns1", "sa1");
    let (tx, mut inbound) = open_stream(&mut client, &jwt).await;

    tx.send(request(&["default"], None)).await.unwrap();
    let first = next(&mut inbound, "the first request is answered", &agent).await;
    assert_eq!(names_of(&first), ["default"]);
    let (chain, key) = tls_certificate(&secrets(&first)[0]);
    assert_eq!(
        leaf_facts(&chain).0,
        ["spiffe://cluster.local/ns/ns1/sa/sa1"]
    );

    // ACK, the name repeated (names are a set): no reply. Then a changed
    // subscription, which is answered.
    tx.send(request(&["default", "default"], Some(&first)))
        .await
        .unwrap();
    tx.send(request(&["default", "ROOTCA"], Some(&first)))
        .await
        .unwrap();
    let second = next(&mut inbound, "a changed subscription is answered", &agent).await;
    assert_eq!(
        names_of(&second),
        ["default", "ROOTCA"],
        "the ACK was not answered: the next response is the change's"
    );
    assert_ne!(second.nonce, first.nonce);

    // NACK, the same names in another order: logged, not answered with the
    // same secret. Then a changed subscription, which is answered.
    tx.send(nack(&["ROOTCA", "default"], &second))
        .await
        .unwrap();
    tx.send(request(&["ROOTCA"], Some(&second))).await.unwrap();
    let third = next(&mut inbound, "a change after a NACK is answered", &agent).await;
    assert_eq!(
        names_of(&third),
        ["ROOTCA"],
        "the NACK was not answered: the next response is the change's"
    );
    agent.wait_log(
        "Envoy rejected the SDS response (NACK): Failed to load certificate chain from <inline>",
        Duration::from_secs(5),
    );

    // A stale nonce is ignored, even when it asks for something else.
    tx.send(request(&["default", "ROOTCA"], Some(&second)))
        .await
        .unwrap();
    tx.send(request(&["default"], Some(&third))).await.unwrap();
    let fourth = next(&mut inbound, "a current change is answered", &agent).await;
    assert_eq!(
        names_of(&fourth),
        ["default"],
        "the stale request was ignored: the next response is the current one's"
    );

    // A NACK that also changes the names is a new subscription: answered.
    tx.send(nack(&["default", "ROOTCA"], &fourth))
        .await
        .unwrap();
    let fifth = next(
        &mut inbound,
        "a NACK changing the names is answered",
        &agent,
    )
    .await;
    assert_eq!(names_of(&fifth), ["default", "ROOTCA"]);
    let s = secrets(&fifth);
    assert_eq!(
        tls_certificate(&s[0]),
        (chain.clone(), key.clone()),
        "no new key for a repeated request"
    );

    // Another stream for the same identity shares the certificate and key.
    let mut other = connect(&agent.socket).await;
    let resp = fetch(&mut other, &["default"], &jwt).await.unwrap();
    assert_eq!(tls_certificate(&secrets(&resp)[0]), (chain, key));
}

/// After a NACK the same secret is never sent again, but the next change is:
/// the renewal is the next message on the stream.
#[tokio::test]
async fn a_nacked_secret_is_not_resent_but_the_next_change_is_pushed() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "4s".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &fake_jwt("nack", "me")).await;
    tx.send(request(&["default", "ROOTCA"], None))
        .await
        .unwrap();
    let first = next(&mut inbound, "the first request is answered", &agent).await;
    tx.send(nack(&["default", "ROOTCA"], &first)).await.unwrap();
    // Renewal at half the 4 s lifetime.
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(6),
        "the renewal after a NACK is pushed",
        || agent.log(),
    )
    .await
    .unwrap();
    assert_ne!(
        pushed.version_info, first.version_info,
        "the NACKed version was sent again"
    );
    assert_ne!(
        tls_certificate(&secrets(&pushed)[0]),
        tls_certificate(&secrets(&first)[0]),
        "the renewed certificate and key"
    );
    assert!(agent.log().contains("renewed workload certificate"));
}

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

/// Duplicate names collapse; too many distinct ones are refused, saying why.
#[tokio::test]
async fn duplicate_names_collapse_and_too_many_are_refused() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("many", "names");
    let many = vec!["default"; 5000];
    let resp = fetch(&mut client, &many, &jwt).await.unwrap();
    assert_eq!(names_of(&resp), ["default"], "one resource, not 5000");
    let mut dup = vec!["ROOTCA"; 10];
    dup.extend(["default"; 10]);
    let resp = fetch(&mut client, &dup, &jwt).await.unwrap();
    assert_eq!(names_of(&resp), ["ROOTCA", "default"]);

    let distinct: Vec<String> = (0..9).map(|i| format!("name{i}")).collect();
    let distinct: Vec<&str> = distinct.iter().map(String::as_str).collect();
    let err = fetch(&mut client, &distinct, &jwt).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("more than 8 distinct resources (SDS_MAX_RESOURCE_NAMES)"),
        "{}",
        err.message()
    );
    let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
    tx.send(request(&distinct, None)).await.unwrap();
    let err = inbound.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
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

#[test]
fn socket_lifecycle_live_stale_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/sds/uds_path");
    let local = [("CA_PROVIDER", "LocalCA".to_string())];
    let mut first = Agent::start_at(&socket, dir.path(), &local);
    assert!(first.log().contains(&format!(
        "SDS gRPC server start, listen {:?}",
        socket.display().to_string()
    )));

    // A second agent on the same live socket refuses to start.
    let mut second = Agent::spawn(&socket, dir.path(), &local);
    let st = second.wait_exit(Duration::from_secs(20));
    assert!(!st.success());
    assert!(
        second.log().contains("another agent is already serving"),
        "{}",
        second.log()
    );

    // SIGTERM: clean exit, socket removed.
    let st = first.terminate();
    assert!(st.success(), "exit status {st:?}; log:\n{}", first.log());
    assert!(!socket.exists(), "socket removed on shutdown");

    // A stale socket file (a killed agent's) is replaced.
    let third = Agent::start_at(&socket, dir.path(), &local);
    drop(third); // SIGKILL leaves the file behind
    assert!(socket.exists());
    let _fourth = Agent::start_at(&socket, dir.path(), &local);
}

#[test]
fn invalid_settings_stop_the_agent_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value, expect) in [
        (
            "CA_PROVIDER",
            "GoogleCA",
            "accepted values are VaultCA, LocalCA",
        ),
        ("SECRET_TTL", "tomorrow", "SECRET_TTL=\"tomorrow\""),
        ("KEY_TYPE", "dsa-1024", "KEY_TYPE=\"dsa-1024\""),
        (
            "TRUST_DOMAIN",
            "Not A Domain",
            "TRUST_DOMAIN=\"Not A Domain\"",
        ),
    ] {
        let mut a = Agent::spawn(
            &dir.path().join("s"),
            dir.path(),
            &[(var, value.to_string())],
        );
        let st = a.wait_exit(Duration::from_secs(20));
        assert_eq!(st.code(), Some(2), "{var}: {}", a.log());
        assert!(a.log().contains(expect), "{var}: {}", a.log());
    }
}

#[tokio::test]
async fn the_open_stream_is_pushed_the_renewed_secret() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "4s".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &fake_jwt("push", "me")).await;
    tx.send(request(&["default", "ROOTCA"], None))
        .await
        .unwrap();
    let first = inbound.next().await.unwrap().unwrap();
    tx.send(request(&["default", "ROOTCA"], Some(&first)))
        .await
        .unwrap();
    // Renewal at half the 4 s lifetime: pushed on this stream without asking.
    let pushed = next_within(
        &mut inbound,
        Duration::from_secs(6),
        "a renewed secret is pushed",
        || agent.log(),
    )
    .await
    .unwrap();
    assert_ne!(pushed.version_info, first.version_info);
    assert_ne!(pushed.nonce, first.nonce);
    let (a, b) = (secrets(&first), secrets(&pushed));
    assert_ne!(
        tls_certificate(&a[0]),
        tls_certificate(&b[0]),
        "new certificate and key"
    );
    assert_eq!(trusted_ca(&a[1]), trusted_ca(&b[1]), "same root");
    assert!(agent.log().contains("renewed workload certificate"));
}

#[tokio::test]
async fn an_identity_nobody_watches_is_evicted() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_EVICTION_PERIOD", "1s".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("gone", "soon");
    let first = fetch(&mut client, &["default"], &jwt).await.unwrap();
    agent.wait_log("evicted idle identity and its key", Duration::from_secs(10));
    // Asking again makes a new key and certificate.
    let again = fetch(&mut client, &["default"], &jwt).await.unwrap();
    assert_ne!(
        tls_certificate(&secrets(&first)[0]).1,
        tls_certificate(&secrets(&again)[0]).1
    );
}

#[tokio::test]
async fn an_unwatched_identity_is_not_renewed_and_costs_no_cpu() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "2s".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("idle", "one");
    fetch(&mut client, &["default"], &jwt).await.unwrap();
    let before = agent.cpu_time();
    // Past the renewal time and the expiry, with nobody watching.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let used = agent.cpu_time() - before;
    assert!(
        used < Duration::from_millis(500),
        "an idle agent used {used:?} of CPU"
    );
    assert!(
        !agent.log().contains("renewed workload certificate"),
        "{}",
        agent.log()
    );
    // Asked again, it issues a fresh certificate.
    let again = fetch(&mut client, &["default"], &jwt).await.unwrap();
    assert!(!secrets(&again).is_empty());
    assert_eq!(
        agent.log().matches("issued workload certificate").count(),
        2
    );
}

#[test]
fn the_istio_socket_flag_wins_over_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let env_socket = dir.path().join("from-env");
    let flag_socket = dir.path().join("from-flag/uds_path");
    for flag in ["--workloadUDSPath", "--workload-uds-path"] {
        let mut agent = Agent::spawn_args(
            &env_socket,
            dir.path(),
            &[("CA_PROVIDER", "LocalCA".into())],
            &[flag, flag_socket.to_str().unwrap()],
        );
        agent.wait_log("SDS gRPC server start", Duration::from_secs(20));
        assert!(
            agent
                .log()
                .contains(&format!("listen {:?}", flag_socket.display().to_string())),
            "{}",
            agent.log()
        );
        assert!(flag_socket.exists() && !env_socket.exists(), "{flag}");
        assert!(agent.terminate().success());
    }
}

/// A stream keeps reading requests while its first fetch waits on Vault: a
/// request is refused, and a changed subscription taken, while Vault (slowed
/// by a front that counts what it is asked) is still being asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keeps_reading_while_its_first_fetch_waits_on_vault() {
    use std::sync::atomic::Ordering;
    use support::vault_env::VaultEnv;
    use support::vault_front::{Tamper, VaultFront};

    let env = VaultEnv::start().await;
    let front = VaultFront::start(
        env.bao.addr(),
        env.bao.client().clone(),
        Tamper::None,
        Duration::from_secs(2),
    )
    .await;
    let agent = Agent::start(&env.agent_env_with(&[
        ("VAULT_ADDR", front.url.as_str()),
        ("CA_ADDR", front.url.as_str()),
    ]));
    let in_flight = || front.stats.in_flight.load(Ordering::SeqCst);
    let mut client = connect(&agent.socket).await;
    let jwt = env.jwt("default", "httpbin");

    // Stream A asks for `default`; once Vault is being asked, it changes to
    // `ROOTCA` (a new request, no nonce).
    let (tx_a, mut inbound_a) = open_stream(&mut client, &jwt).await;
    tx_a.send(request(&["default"], None)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while in_flight() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "Vault never asked\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx_a.send(request(&["ROOTCA"], None)).await.unwrap();

    // Stream B, same JWT, sends a request then a bad one: refused at once.
    let (tx_b, mut inbound_b) = open_stream(&mut client, &jwt).await;
    tx_b.send(request(&["default"], None)).await.unwrap();
    let mut bad = request(&["default"], None);
    bad.type_url = "type.googleapis.com/not.a.Secret".into();
    tx_b.send(bad).await.unwrap();
    let err = next_within(
        &mut inbound_b,
        Duration::from_secs(10),
        "B's refusal",
        || agent.log(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        in_flight() > 0,
        "the refusal came while Vault was still being asked"
    );

    // A is served once Vault has answered, with the names of its latest request.
    let first = next(&mut inbound_a, "A is served", &agent).await;
    assert_eq!(
        names_of(&first),
        ["ROOTCA"],
        "the change was taken while the fetch waited"
    );
    assert_eq!(env.count("auth/kubernetes/login"), 1, "one login for both");
}

/// What the SDS server does is counted: pushes by resource, streams open,
/// NACKs, refusals by reason.
#[tokio::test]
async fn sds_events_are_counted_in_metrics() {
    use support::metrics::scrape;
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let (tx, mut inbound) = open_stream(&mut client, &fake_jwt("counted", "one")).await;
    tx.send(request(&["default", "ROOTCA"], None))
        .await
        .unwrap();
    let first = next(&mut inbound, "served", &agent).await;
    tx.send(nack(&["default", "ROOTCA"], &first)).await.unwrap();
    tx.send(request(&["ROOTCA"], Some(&first))).await.unwrap();
    let second = next(&mut inbound, "the change after the NACK", &agent).await;
    assert_eq!(names_of(&second), ["ROOTCA"]);
    let err = fetch(&mut client, &["bogus"], &fake_jwt("counted", "one"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = fetch(&mut client, &["default"], "garbage")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let m = scrape(&agent.status_url("/metrics"), "prometheus").await;
    assert_eq!(m.get("node_agent_sds_streams_open", &[]), 1.0);
    let pushes = |r: &str| m.get("node_agent_sds_pushes_total", &[("resource", r)]);
    assert_eq!((pushes("default"), pushes("ROOTCA")), (1.0, 2.0));
    assert_eq!(m.get("node_agent_sds_nacks_total", &[]), 1.0);
    let refused = |r: &str| m.get("node_agent_sds_requests_refused_total", &[("reason", r)]);
    assert_eq!(refused("invalid_request"), 1.0);
    assert_eq!(refused("credential"), 1.0);
    assert_eq!(refused("limits"), 0.0);
    drop((tx, inbound));
}

/// A client that sends its request and half-closes (as grpcurl or a one-shot
/// fetcher does) is answered before the stream ends: a half-close says "no
/// more requests", not "cancel".
#[tokio::test]
async fn a_half_closed_stream_is_answered_then_ended() {
    let agent = local_agent();
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "half-closed");
    let mut inbound = client
        .stream_secrets(with_jwt(
            tokio_stream::iter(vec![request(&["default"], None)]),
            &jwt,
        ))
        .await
        .expect("open StreamSecrets")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("an answer within 10 s")
        .expect("no error status")
        .expect("a response before the stream ends");
    assert_eq!(
        served_uris(&first),
        ["spiffe://cluster.local/ns/default/sa/half-closed"]
    );
    let end = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("the stream ends once answered");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// Streams of one connection, each sending an Envoy-sized request (60 KiB)
/// while the buffered-request budget holds one such request at a time, are
/// all answered. Streams waiting for budget hold what their client sent them
/// (a stream window each) in HTTP/2's buffers; with a connection window of
/// 64 KiB, four of them left the stream holding the budget no window for the
/// rest of its request, and every stream ended with DEADLINE_EXCEEDED
/// (h2load's 100 connections of 10 streams did, in the benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_waiting_for_request_budget_leave_their_connection_window() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SDS_MAX_REQUEST_BYTES", "65536".into()),
        ("SDS_MAX_BUFFERED_REQUEST_BYTES", "70000".into()),
        ("SDS_FIRST_REQUEST_TIMEOUT", "5s".into()),
    ]);
    let client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "big-requests");
    let mut req = request(&["default"], None);
    req.node = Some(envoy_types::pb::envoy::config::core::v3::Node {
        id: "x".repeat(60 * 1024),
        ..Default::default()
    });
    // 12 streams on one connection (under SDS_CONNECTION_MAX_STREAMS=16).
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let mut c = client.clone();
            let r = with_jwt(req.clone(), &jwt);
            tokio::spawn(async move { c.fetch_secrets(r).await })
        })
        .collect();
    for c in calls {
        let resp = c
            .await
            .unwrap()
            .expect("every stream is served (none ends with DEADLINE_EXCEEDED)");
        assert_eq!(
            served_uris(resp.get_ref()),
            ["spiffe://cluster.local/ns/default/sa/big-requests"]
        );
    }
}

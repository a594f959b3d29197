//! The SPIFFE Workload API (`WORKLOAD_API_SOCKET`) seen by two third-party
//! clients, the crates.io `spiffe` crate and py-spiffe (PyPI `spiffe`): an
//! SVID whose SPIFFE ID and chain verify against the bundle, from the same
//! cache as SDS; rotations and root changes pushed on the open stream; and
//! the documented errors without the header, without a token file, and for
//! the JWT-SVID methods.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use node_agent::workload_api::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use node_agent::workload_api::pb::{X509BundlesRequest, X509svidRequest};
use prost::Message;
use rcgen::PublicKeyData;
use spiffe::{TrustDomain, WorkloadApiClient, WorkloadApiError, X509BundleSet, X509Svid};
use support::agent::Agent;
use support::bao::{rotate_root, PKI_MOUNT, PKI_ROLE};
use support::sds_client::{self, fake_jwt};
use tokio_stream::StreamExt;
use x509_parser::prelude::*;

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

/// An agent in one-workload mode (token file) serving the Workload API, or
/// without a token file when `token` is false.
struct ApiAgent {
    agent: Agent,
    api_socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn api_agent(token: bool, extra: &[(&'static str, String)]) -> ApiAgent {
    let dir = tempfile::tempdir().unwrap();
    let api_socket = dir.path().join("workload-api").join("socket");
    let mut env = vec![
        ("CA_PROVIDER", "LocalCA".to_string()),
        ("WORKLOAD_API_SOCKET", api_socket.display().to_string()),
    ];
    if token {
        let path = dir.path().join("token");
        std::fs::write(&path, fake_jwt("default", "httpbin")).unwrap();
        env.push(("WORKLOAD_TOKEN_PATH", path.display().to_string()));
    }
    env.extend(extra.iter().cloned());
    let agent = Agent::start_at(&dir.path().join("sds").join("uds_path"), dir.path(), &env);
    agent.wait_log("SPIFFE Workload API server start", Duration::from_secs(10));
    ApiAgent {
        agent,
        api_socket,
        _dir: dir,
    }
}

fn endpoint(socket: &Path) -> String {
    format!("unix:{}", socket.display())
}

/// The SVID names `SPIFFE_ID`, its key is its leaf's, and its chain verifies
/// up to a self-signed authority of its trust domain's bundle. Returns the
/// leaf serial.
fn verify(svid: &X509Svid, bundles: &X509BundleSet) -> String {
    assert_eq!(svid.spiffe_id().to_string(), SPIFFE_ID);
    let chain: Vec<X509Certificate> = svid
        .cert_chain()
        .iter()
        .map(|c| X509Certificate::from_der(c.as_bytes()).unwrap().1)
        .collect();
    let leaf = &chain[0];
    let key = rcgen::KeyPair::try_from(svid.private_key().as_bytes()).expect("PKCS#8 key");
    assert_eq!(
        key.subject_public_key_info(),
        leaf.public_key().raw,
        "the key is the leaf's"
    );
    for pair in chain.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .expect("each certificate is signed by the next");
    }
    let td = TrustDomain::new("cluster.local").unwrap();
    let bundle = bundles
        .get(&td)
        .expect("a bundle for the SVID's trust domain");
    let last = chain.last().unwrap();
    let root = bundle
        .authorities()
        .iter()
        .map(|a| X509Certificate::from_der(a.as_bytes()).unwrap().1)
        .find(|root| last.verify_signature(Some(root.public_key())).is_ok())
        .expect("the chain verifies against an authority of the bundle");
    root.verify_signature(None).expect("a self-signed root");
    assert!(leaf.validity().is_valid());
    leaf.raw_serial_as_string()
}

#[tokio::test]
async fn spiffe_crate_gets_a_verified_svid_then_a_rotation_on_the_same_stream() {
    let a = api_agent(
        true,
        &[
            ("SECRET_TTL", "6s".into()),
            ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0".into()),
        ],
    );
    let client = WorkloadApiClient::connect_to(endpoint(&a.api_socket))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let serial = verify(&svid, &bundles);

    // One cache: SDS serves this workload the very same certificate.
    let mut sds = sds_client::connect(&a.agent.socket).await;
    let resp = sds_client::fetch(&mut sds, &["default"], &fake_jwt("default", "httpbin"))
        .await
        .unwrap();
    let (chain, _) = sds_client::tls_certificate(&sds_client::secrets(&resp)[0]);
    assert_eq!(sds_client::leaf_facts(&chain).1, serial);

    // The stream pushes the renewed SVID (6 s lifetime, renewed at 3 s).
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let mut serials = vec![];
    while serials.len() < 2 {
        let ctx = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no rotation within 15 s; saw {serials:?}\n{}",
                    a.agent.log()
                )
            })
            .expect("the stream stays open")
            .unwrap();
        let svid = ctx.default_svid().unwrap();
        let s = verify(svid, ctx.bundle_set());
        if !serials.contains(&s) {
            serials.push(s);
        }
    }
    assert!(a.agent.log().contains("Workload API: FetchX509SVID sent"));

    // The JWT-SVID profile is refused with a reason.
    for err in [
        client
            .fetch_jwt_svid(&["audience"], None)
            .await
            .map(|_| ())
            .unwrap_err(),
        client.fetch_jwt_bundles().await.map(|_| ()).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            msg.contains("Unimplemented")
                || msg.contains("UNIMPLEMENTED")
                || msg.contains("unimplemented"),
            "{msg}"
        );
        assert!(msg.contains("X.509 certificates only"), "{msg}");
    }
    let body = String::from_utf8_lossy(svid.private_key().as_bytes()).to_string();
    assert!(!a.agent.log().contains(&body), "key in the log");
}

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

/// Runs tests/pyspiffe/check.py with the `python3` on PATH (test.sh puts the
/// peers' virtualenv, which has py-spiffe, first) and returns its JSON line.
fn py_spiffe(args: &[&str], agent: &Agent) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyspiffe/check.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spiffe check {args:?} failed ({}):\n{stdout}\n{}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_gets_a_verified_svid_sees_a_rotation_and_the_errors() {
    let a = api_agent(
        true,
        &[
            ("SECRET_TTL", "6s".into()),
            ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0".into()),
        ],
    );
    let node = api_agent(false, &[]);
    let socket = a.api_socket.display().to_string();
    let node_socket = node.api_socket.display().to_string();
    let agent_log = &a.agent;

    let (svid, no_header, denied) = tokio::task::block_in_place(|| {
        (
            py_spiffe(&["svid", &socket, SPIFFE_ID, "2", "20"], agent_log),
            py_spiffe(&["no-header", &socket], agent_log),
            py_spiffe(&["denied", &node_socket], &node.agent),
        )
    });
    // py-spiffe verified the SVID against the bundle and saw two serials.
    let serials = svid["serials"].as_array().unwrap();
    assert_eq!(serials.len(), 2, "{svid}");
    assert!(svid["bundle_authorities"].as_u64().unwrap() >= 1, "{svid}");
    assert!(svid["fetch_jwt_svid"]
        .as_str()
        .unwrap()
        .contains("UNIMPLEMENTED"));
    // The first serial is the agent's certificate (the agent logs it
    // with colons; py-spiffe prints hex without leading zeros).
    let log = a.agent.log();
    let first = svid["first_serial"].as_str().unwrap();
    assert!(
        log.lines()
            .filter(|l| l.contains("Workload API: FetchX509SVID sent"))
            .any(|l| l.replace(':', "").to_lowercase().contains(first)),
        "{first} not in\n{log}"
    );

    assert_eq!(no_header["code"], "INVALID_ARGUMENT", "{no_header}");
    assert_eq!(no_header["details"], "security header missing from request");
    let denied = denied["error"].as_str().unwrap();
    assert!(denied.contains("PERMISSION_DENIED"), "{denied}");
    assert!(
        denied.contains("node-wide attestation is not supported"),
        "{denied}"
    );
}

/// DER of the certificates in a PEM text.
fn pem_ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|b| b.unwrap().contents)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_root_change_reaches_the_open_stream_and_the_files() {
    let env = support::vault_env::VaultEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, env.jwt("default", "httpbin")).unwrap();
    // A PKI role written without basic_constraints_valid_for_non_ca (as
    // Istio's Vault tutorial writes it, and roles made before vault-setup
    // set it) has Vault leave basicConstraints out of leaves.
    let path = format!("{PKI_MOUNT}/roles/{PKI_ROLE}");
    let set_basic_constraints = |on: bool| {
        let (bao, path) = (&env.bao, path.clone());
        async move {
            let mut role =
                bao.root(reqwest::Method::GET, &path, None).await.unwrap()["data"].take();
            role["basic_constraints_valid_for_non_ca"] = serde_json::json!(on);
            bao.root(reqwest::Method::POST, &path, Some(role))
                .await
                .unwrap();
        }
    };
    set_basic_constraints(false).await;
    let api_socket = dir.path().join("api.sock");
    let out = dir.path().join("certs");
    let vars = env.agent_env_with(&[
        ("SECRET_TTL", "10s"),
        ("WORKLOAD_TOKEN_PATH", &token.display().to_string()),
        ("WORKLOAD_API_SOCKET", &api_socket.display().to_string()),
        ("OUTPUT_CERTS", &out.display().to_string()),
    ]);
    let agent = Agent::start_at(&dir.path().join("sds.sock"), dir.path(), &vars);
    agent.wait_log("SPIFFE Workload API server start", Duration::from_secs(10));
    let client = WorkloadApiClient::connect_to(endpoint(&api_socket))
        .await
        .unwrap();

    // SPIFFE clients refuse such a leaf; the agent says so and names the
    // role setting.
    let err = client.fetch_x509_svid().await.map(|_| ()).unwrap_err();
    assert!(
        format!("{err:?}").contains("2.5.29.19"),
        "the spiffe crate refuses a leaf without basicConstraints: {err:?}"
    );
    agent.wait_log(
        "basic_constraints_valid_for_non_ca=true",
        Duration::from_secs(5),
    );
    // With the role fixed, the next certificate (10 s lifetime, renewed at
    // about 5 s) is a valid X509-SVID.
    set_basic_constraints(true).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.fetch_x509_svid().await {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "still refused after the role was fixed: {e:?}\n{}",
                agent.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    verify(first.default_svid().unwrap(), first.bundle_set());

    let new_root = pem_ders(&rotate_root(&env.bao).await.unwrap()).remove(0);
    let td = TrustDomain::new("cluster.local").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("the new root never reached the stream\n{}", agent.log()))
            .expect("the stream stays open")
            .unwrap();
        // Every message verifies: the SVID against the bundle sent with it.
        verify(ctx.default_svid().unwrap(), ctx.bundle_set());
        let bundle = ctx.bundle_set().get(&td).unwrap();
        if bundle
            .authorities()
            .iter()
            .any(|a| a.as_bytes() == new_root)
        {
            let last = ctx
                .default_svid()
                .unwrap()
                .cert_chain()
                .last()
                .unwrap()
                .as_bytes()
                .to_vec();
            let (_, last) = X509Certificate::from_der(&last).unwrap();
            let (_, root) = X509Certificate::from_der(&new_root).unwrap();
            if last.verify_signature(Some(root.public_key())).is_ok() {
                break; // an SVID of the new root, with the new root
            }
        }
    }
    // The files follow: root-cert.pem holds the new root, and the chain in
    // cert-chain.pem is signed by it.
    loop {
        let roots = std::fs::read_to_string(out.join("root-cert.pem")).unwrap();
        let chain = pem_ders(&std::fs::read_to_string(out.join("cert-chain.pem")).unwrap());
        let (_, last) = X509Certificate::from_der(chain.last().unwrap()).unwrap();
        let (_, root) = X509Certificate::from_der(&new_root).unwrap();
        if pem_ders(&roots).contains(&new_root)
            && last.verify_signature(Some(root.public_key())).is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the files never got the new root\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.log().contains("wrote the certificate files"));
}

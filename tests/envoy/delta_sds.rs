//! Delta SDS (`DeltaSecrets`): the protocol rules seen from a Rust client,
//! and real Envoys on `api_type: DELTA_GRPC` sources (`envoy_grpc` and
//! `google_grpc`) doing mTLS through rotations and an agent restart.

use crate::support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use support::agent::Agent;
use support::envoy::*;
use support::mesh::{Mesh, CLIENT_ID, SERVER_ID};
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

/// A delta request: subscribe, unsubscribe, and optionally (N)ACK `nonce`.
fn delta(subscribe: &[&str], unsubscribe: &[&str], nonce: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.unwrap_or_default().to_string(),
        ..Default::default()
    }
}

fn nack(nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: "test NACK".into(),
            ..Default::default()
        }),
        ..delta(&[], &[], Some(nonce))
    }
}

struct DeltaStream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl DeltaStream {
    async fn open(client: &mut SecretDiscoveryServiceClient<Channel>, jwt: Option<&str>) -> Self {
        Self::try_open(client, jwt)
            .await
            .expect("open DeltaSecrets")
    }

    /// Opens a stream, or the status it was refused with.
    async fn try_open(
        client: &mut SecretDiscoveryServiceClient<Channel>,
        jwt: Option<&str>,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        let body = tokio_stream::wrappers::ReceiverStream::new(rx);
        let req = match jwt {
            Some(jwt) => with_jwt(body, jwt),
            None => tonic::Request::new(body),
        };
        let rx = client.delta_secrets(req).await?.into_inner();
        Ok(Self { tx, rx })
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.expect("stream open");
    }

    /// The next message, or a panic naming `what` with the agent's log.
    async fn next(
        &mut self,
        what: &str,
        agent: &Agent,
    ) -> Result<DeltaDiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(WAIT, self.rx.next()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("{what}: the stream ended without a status\n{}", agent.log()),
            Err(_) => panic!("{what}: nothing within {WAIT:?}\n{}", agent.log()),
        }
    }

    /// The status the stream ends with next, or a panic naming `what`.
    async fn next_err(&mut self, what: &str, agent: &Agent) -> tonic::Status {
        match self.next(what, agent).await {
            Err(status) => status,
            Ok(resp) => panic!(
                "{what}: answered {}\n{}",
                summary(&shorten_names(resp)),
                agent.log()
            ),
        }
    }

    async fn next_ok(&mut self, what: &str, agent: &Agent) -> DeltaDiscoveryResponse {
        self.next(what, agent)
            .await
            .unwrap_or_else(|s| panic!("{what}: {s:?}\n{}", agent.log()))
    }
}

/// (name, version) of each resource in a response, checking each decodes as
/// the Secret of that name.
fn carried(resp: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    assert_eq!(resp.type_url, SECRET_TYPE);
    resp.resources
        .iter()
        .map(|r| {
            let any = r.resource.as_ref().expect("resource body");
            assert_eq!(any.type_url, SECRET_TYPE);
            let secret = Secret::decode(any.value.as_slice()).unwrap();
            assert_eq!(secret.name, r.name, "resource and secret names agree");
            assert!(!r.version.is_empty(), "every resource has a version");
            (r.name.clone(), r.version.clone())
        })
        .collect()
}

fn secret_of(resp: &DeltaDiscoveryResponse, name: &str) -> Secret {
    let r = resp
        .resources
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no {name} in {}", summary(resp)));
    Secret::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap()
}

/// A short description of a response for assertion messages (no key bytes).
fn summary(resp: &DeltaDiscoveryResponse) -> String {
    let carried: Vec<(&str, &str)> = resp
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    format!(
        "resources {carried:?}, removed {:?}, nonce {}",
        resp.removed_resources, resp.nonce
    )
}

/// A response with the names it carries cut short, for a panic message.
fn shorten_names(mut resp: DeltaDiscoveryResponse) -> DeltaDiscoveryResponse {
    for n in &mut resp.removed_resources {
        n.truncate(40);
    }
    resp
}

fn names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    carried(resp).into_iter().map(|(n, _)| n).collect()
}

#[tokio::test]
async fn delta_protocol_subscribe_ack_nack_removed_and_stale_nonces() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SECRET_TTL", "6s".into()),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0".into()),
    ]);
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "httpbin");
    let mut nonces = HashSet::new();
    let mut unique = |r: &DeltaDiscoveryResponse| {
        assert!(!r.nonce.is_empty(), "every response has a nonce");
        assert!(nonces.insert(r.nonce.clone()), "nonce {} reused", r.nonce);
    };

    // Subscribe (with a duplicate): one resource per name, each named and versioned.
    let mut a = DeltaStream::open(&mut client, Some(&jwt)).await;
    a.send(delta(&["default", "ROOTCA", "default"], &[], None))
        .await;
    let first = a.next_ok("first subscribe", &agent).await;
    unique(&first);
    let versions: HashMap<String, String> = carried(&first).into_iter().collect();
    assert_eq!(names(&first), ["default", "ROOTCA"], "{}", summary(&first));
    assert!(first.removed_resources.is_empty());
    let (chain, key) = tls_certificate(&secret_of(&first, "default"));
    assert_eq!(
        leaf_facts(&chain).0,
        ["spiffe://cluster.local/ns/default/sa/httpbin"]
    );
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(trusted_ca(&secret_of(&first, "ROOTCA")).contains("BEGIN CERTIFICATE"));

    // An ACK is not answered: the next message on the stream is the answer to
    // the request after it (responses are in order), removing an unknown name.
    a.send(delta(&[], &[], Some(&first.nonce))).await;
    a.send(delta(&["no-such-secret"], &[], None)).await;
    let removed = a.next_ok("unknown name", &agent).await;
    unique(&removed);
    assert!(removed.resources.is_empty(), "{}", summary(&removed));
    assert_eq!(removed.removed_resources, ["no-such-secret"]);

    // Unsubscribe then subscribe again: answered although nothing changed.
    a.send(delta(&[], &["ROOTCA"], Some(&removed.nonce))).await;
    a.send(delta(&["ROOTCA"], &[], None)).await;
    let again = a.next_ok("re-subscribe", &agent).await;
    unique(&again);
    assert_eq!(
        carried(&again),
        [("ROOTCA".to_string(), versions["ROOTCA"].clone())]
    );

    // A NACK is not answered, and the NACKed version is not sent again...
    a.send(nack(&again.nonce)).await;
    a.send(delta(&["other-unknown"], &[], None)).await;
    let after_nack = a.next_ok("after NACK", &agent).await;
    unique(&after_nack);
    assert_eq!(
        after_nack.removed_resources,
        ["other-unknown"],
        "{}",
        summary(&after_nack)
    );
    // ...but the next change is: the rotation (SECRET_TTL=6s, renewed at half
    // life) brings only the changed `default`, not the unchanged ROOTCA.
    let started = Instant::now();
    let rotated = a.next_ok("rotation push", &agent).await;
    unique(&rotated);
    let got = carried(&rotated);
    assert_eq!(got.len(), 1, "only the changed resource: {got:?}");
    assert_eq!(got[0].0, "default");
    assert_ne!(got[0].1, versions["default"], "a new certificate version");
    assert!(started.elapsed() < Duration::from_secs(6));

    // A second stream of the same identity whose initial_resource_versions
    // claim the current versions (a reconnect) is still answered in full, with
    // a stale nonce from "a previous stream" tolerated; it shares the cache:
    // the same certificate as the first stream.
    let mut b = DeltaStream::open(&mut client, Some(&jwt)).await;
    let current: HashMap<String, String> = [
        ("default".to_string(), got[0].1.clone()),
        ("ROOTCA".to_string(), versions["ROOTCA"].clone()),
    ]
    .into();
    b.send(DeltaDiscoveryRequest {
        initial_resource_versions: current.clone(),
        ..delta(&["default", "ROOTCA"], &[], Some("deadbeef-1-1"))
    })
    .await;
    let reconnect = b.next_ok("reconnect with current versions", &agent).await;
    unique(&reconnect);
    let got: HashMap<String, String> = carried(&reconnect).into_iter().collect();
    assert_eq!(got, current, "answered with exactly the current versions");
    assert_eq!(
        tls_certificate(&secret_of(&reconnect, "default")),
        tls_certificate(&secret_of(&rotated, "default")),
        "one cache: the same certificate and key on both streams"
    );

    // StreamSecrets of the same identity gets the very same certificate.
    let sotw = fetch(&mut client, &["default"], &jwt).await.unwrap();
    assert_eq!(
        tls_certificate(&secrets(&sotw)[0]),
        tls_certificate(&secret_of(&reconnect, "default"))
    );
    let log = agent.log();
    assert_eq!(
        log.matches("issued workload certificate").count(),
        1,
        "one issue for the identity whatever the protocol:\n{log}"
    );
    assert!(
        log.contains("Envoy rejected the SDS delta response (NACK)"),
        "{log}"
    );
    assert!(!log.contains(&jwt), "JWT in the log");
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!log.contains(&body[..40]), "key material in the log");
}

#[tokio::test]
async fn delta_refusals_carry_the_documented_status() {
    let agent = Agent::start(&[("CA_PROVIDER", "LocalCA".into())]);
    let mut client = connect(&agent.socket).await;
    let jwt = fake_jwt("default", "sleep");

    let mut s = DeltaStream::open(&mut client, None).await;
    s.send(delta(&["default"], &[], None)).await;
    let err = s.next("no credential", &agent).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("WORKLOAD_TOKEN_PATH"), "{err:?}");

    let mut s = DeltaStream::open(&mut client, Some(&jwt)).await;
    s.send(DeltaDiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..delta(&["default"], &[], None)
    })
    .await;
    let err = s.next("wrong type", &agent).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Positive control on the same connection: a valid stream is served.
    let mut s = DeltaStream::open(&mut client, Some(&jwt)).await;
    s.send(delta(&["default"], &[], None)).await;
    assert_eq!(names(&s.next_ok("valid", &agent).await), ["default"]);
}

/// A stream that should be served: its first response carries `default`.
async fn served(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    jwt: &str,
    agent: &Agent,
) -> DeltaStream {
    let mut s = DeltaStream::open(client, Some(jwt)).await;
    s.send(delta(&["default"], &[], None)).await;
    assert_eq!(
        names(&s.next_ok("a stream within the bounds", agent).await),
        ["default"]
    );
    s
}

/// The refusal of a stream past a cap, or a panic.
async fn refused(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    jwt: &str,
    agent: &Agent,
) -> tonic::Status {
    match DeltaStream::try_open(client, Some(jwt)).await {
        Err(status) => status,
        Ok(mut s) => {
            s.send(delta(&["default"], &[], None)).await;
            s.next_err("a stream past a cap", agent).await
        }
    }
}

/// `DeltaSecrets` streams are held to every bound `StreamSecrets` streams
/// are (issue 7's), by the same code: streams per connection and in total,
/// names per request, request size, the first-request deadline, and the
/// connection's budget of new JWTs. Each refusal names its setting; each
/// check has a positive control just inside the bound.
#[tokio::test]
async fn delta_streams_obey_the_sds_bounds() {
    let agent = Agent::start(&[
        ("CA_PROVIDER", "LocalCA".into()),
        ("SDS_CONNECTION_MAX_STREAMS", "3".into()),
        ("SDS_MAX_STREAMS", "5".into()),
        ("SDS_MAX_RESOURCE_NAMES", "4".into()),
        ("SDS_MAX_REQUEST_BYTES", "16KiB".into()),
        ("SDS_FIRST_REQUEST_TIMEOUT", "1s".into()),
        ("SDS_CONNECTION_NEW_JWT_BURST", "2".into()),
        ("SDS_CONNECTION_NEW_JWT_INTERVAL", "1h".into()),
    ]);
    let jwt = fake_jwt("bounds", "delta");

    // SDS_CONNECTION_MAX_STREAMS: three delta streams on one connection are
    // served, the fourth is refused.
    let mut one = connect(&agent.socket).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(served(&mut one, &jwt, &agent).await);
    }
    let e = refused(&mut one, &jwt, &agent).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("SDS_CONNECTION_MAX_STREAMS=3"),
        "{e:?}"
    );

    // SDS_MAX_STREAMS: two more on another connection make five; the sixth
    // is refused, and served once a place is given back.
    let mut two = connect(&agent.socket).await;
    held.push(served(&mut two, &jwt, &agent).await);
    held.push(served(&mut two, &jwt, &agent).await);
    let mut three = connect(&agent.socket).await;
    let e = refused(&mut three, &jwt, &agent).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("SDS_MAX_STREAMS=5"), "{e:?}");
    drop(held);
    let deadline = Instant::now() + WAIT;
    let s = loop {
        match DeltaStream::try_open(&mut three, Some(&jwt)).await {
            Ok(mut s) => {
                s.send(delta(&["default"], &[], None)).await;
                let resp = s.next_ok("after the streams closed", &agent).await;
                assert_eq!(names(&resp), ["default"]);
                break s;
            }
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("places not given back: {e:?}\n{}", agent.log()),
        }
    };
    drop(s);

    // SDS_MAX_RESOURCE_NAMES: four distinct names are answered (two served,
    // two removed); five, to subscribe or to unsubscribe, are refused.
    let mut four = connect(&agent.socket).await;
    let mut s = DeltaStream::open(&mut four, Some(&jwt)).await;
    s.send(delta(
        &["default", "ROOTCA", "x1", "x2", "default"],
        &[],
        None,
    ))
    .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let resp = s.next_ok("four distinct names", &agent).await;
        got.extend(names(&resp));
        got.extend(resp.removed_resources);
    }
    got.sort();
    assert_eq!(got, ["ROOTCA", "default", "x1", "x2"]);
    drop(s);
    let five = ["default", "ROOTCA", "x1", "x2", "x3"];
    for (sub, unsub) in [(&five[..], &[][..]), (&["default"][..], &five[..])] {
        let mut s = DeltaStream::open(&mut four, Some(&jwt)).await;
        s.send(delta(sub, unsub, None)).await;
        let e = s.next_err("five distinct names", &agent).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message()
                .contains("more than 4 distinct resources (SDS_MAX_RESOURCE_NAMES)"),
            "{e:?}"
        );
    }

    // SDS_MAX_REQUEST_BYTES: a 20 KiB request is refused from its header; a
    // 12 KiB one is read (its unknown name answered as removed).
    let mut s = DeltaStream::open(&mut four, Some(&jwt)).await;
    let small = "s".repeat(12 << 10);
    s.send(delta(&[&small], &[], None)).await;
    let resp = s
        .next_ok("a request under SDS_MAX_REQUEST_BYTES", &agent)
        .await;
    assert_eq!(resp.removed_resources, [small]);
    let big = "b".repeat(20 << 10);
    s.send(delta(&[&big], &[], None)).await;
    let e = s
        .next_err("a request over SDS_MAX_REQUEST_BYTES", &agent)
        .await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("more than SDS_MAX_REQUEST_BYTES=16384"),
        "{e:?}"
    );

    // SDS_FIRST_REQUEST_TIMEOUT: a stream that sends nothing is closed.
    let started = Instant::now();
    let mut s = DeltaStream::open(&mut four, Some(&jwt)).await;
    let e = s.next_err("a silent stream", &agent).await;
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("SDS_FIRST_REQUEST_TIMEOUT=1s"),
        "{e:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));

    // SDS_CONNECTION_NEW_JWT_BURST: a connection's two new JWTs are served,
    // its third is refused without reaching the CA.
    let mut five_conn = connect(&agent.socket).await;
    let _a = served(&mut five_conn, &fake_jwt("burst", "a"), &agent).await;
    let _b = served(&mut five_conn, &fake_jwt("burst", "b"), &agent).await;
    let e = refused(&mut five_conn, &fake_jwt("burst", "c"), &agent).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("SDS_CONNECTION_NEW_JWT_BURST=2"),
        "{e:?}"
    );
}

/// Sends requests through the mesh for `how_long`, each on a new connection
/// (a new mTLS handshake), recording failures and the leaf serials both
/// Envoys hold.
async fn drive(mesh: &Mesh, how_long: Duration) -> (usize, Vec<String>, Vec<BTreeMap<String, ()>>) {
    let mut seen = vec![BTreeMap::new(), BTreeMap::new()];
    let (mut total, mut failures) = (0, Vec::new());
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        total += 1;
        match http
            .get(format!("http://127.0.0.1:{}/", mesh.client_port))
            .header("connection", "close")
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => failures.push(format!("status {}", r.status())),
            Err(e) => failures.push(e.to_string()),
        }
        for (i, (envoy, id)) in [(&mesh.server, SERVER_ID), (&mesh.client, CLIENT_ID)]
            .into_iter()
            .enumerate()
        {
            for (uri, serial, _) in leaf_certs(&envoy.certs().await) {
                if uri == id {
                    seen[i].insert(serial, ());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (total, failures, seen)
}

/// Both Envoys: no rejected update on either secret, and updates happened.
async fn assert_no_rejections(mesh: &Mesh) {
    for envoy in [&mesh.server, &mesh.client] {
        for name in ["default", "ROOTCA"] {
            let rejected = envoy.stat(&format!("sds.{name}.update_rejected")).await;
            let success = envoy.stat(&format!("sds.{name}.update_success")).await;
            assert_eq!(
                rejected,
                Some(0),
                "sds.{name}.update_rejected\n{}",
                envoy.log_tail()
            );
            assert!(
                success.unwrap_or(0) >= 1,
                "sds.{name}.update_success = {success:?}"
            );
        }
    }
}

/// The mesh on delta sources: mTLS, two rotations seen by both Envoys with
/// every request served, then an agent restart (Envoy reconnects, reports
/// the versions it holds, and gets a new certificate from the new agent).
async fn rotations_and_restart(mesh: &Mesh, agents: &mut [Agent], restart: impl Fn(&mut [Agent])) {
    let resp = mesh.get().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()[HDR_SERVER_SAW_CLIENT_URI].to_str().unwrap(),
        CLIENT_ID
    );
    assert_eq!(
        resp.headers()[HDR_CLIENT_SAW_SERVER_URI].to_str().unwrap(),
        SERVER_ID
    );

    // SECRET_TTL=20s renews at about 10 s: two rotations within ~25 s.
    let logs = |agents: &[Agent]| {
        agents
            .iter()
            .map(Agent::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let (total, failures, seen) = drive(mesh, Duration::from_secs(25)).await;
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {failures:?}\n{}",
        failures.len(),
        logs(agents)
    );
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.len() >= 3,
            "Envoy {i} saw two rotations: {s:?}\n{}",
            logs(agents)
        );
    }
    assert_no_rejections(mesh).await;
    let all = logs(agents);
    assert!(all.contains("SDS delta: push"), "{all}");
    assert!(
        !all.contains("SDS: push"),
        "Envoy used state-of-the-world SDS:\n{all}"
    );

    // Restart the agent(s): Envoy keeps serving on what it has, reconnects
    // and is answered although it reports the versions it holds.
    let before = seen.clone();
    // The restart waits on processes: off the runtime's worker, so that the
    // backend keeps answering meanwhile.
    tokio::task::block_in_place(|| restart(agents));
    let (total, failures, seen) = drive(mesh, Duration::from_secs(8)).await;
    assert!(
        failures.is_empty(),
        "{} of {total} failed across the restart: {failures:?}\n{}",
        failures.len(),
        logs(agents)
    );
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.keys().any(|serial| !before[i].contains_key(serial)),
            "Envoy {i} got a certificate from the restarted agent: before {:?}, after {s:?}\n{}",
            before[i],
            logs(agents)
        );
    }
    assert_no_rejections(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_google_grpc_mtls_rotation_and_agent_restart() {
    let env = VaultEnv::start().await;
    let vars = env.agent_env_with(&[("SECRET_TTL", "20s")]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds").join("uds_path");
    let first = Agent::start_at(&socket, dir.path(), &vars);
    let tokens = tempfile::tempdir().unwrap();
    let source = |name: &str, jwt: String| {
        let token = tokens.path().join(name);
        std::fs::write(&token, jwt).unwrap();
        SdsSource::Delta(Box::new(SdsSource::GoogleGrpc {
            uds_path: socket.clone(),
            token_file: token,
        }))
    };
    let mut agents = vec![first];
    let mesh = Mesh::start_with(
        source("server", env.jwt("default", "httpbin")),
        source("client", env.jwt("default", "sleep")),
        "ok",
        || agents[0].log(),
    )
    .await;
    rotations_and_restart(&mesh, &mut agents, |agents| {
        let st = agents[0].terminate();
        assert!(st.success(), "{}", agents[0].log());
        agents[0] = Agent::start_at(&socket, dir.path(), &vars);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_envoy_grpc_per_pod_agents_mtls_rotation_and_restart() {
    let env = VaultEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pod = |name: &str, sa: &str| {
        let token = dir.path().join(format!("{name}-token"));
        std::fs::write(&token, env.jwt("default", sa)).unwrap();
        let socket = dir.path().join(name).join("uds_path");
        let vars = env.agent_env_with(&[
            ("SECRET_TTL", "20s"),
            ("WORKLOAD_TOKEN_PATH", &token.display().to_string()),
        ]);
        (socket, vars)
    };
    let pods = [pod("server", "httpbin"), pod("client", "sleep")];
    let mut agents: Vec<Agent> = pods
        .iter()
        .map(|(socket, vars)| Agent::start_at(socket, dir.path(), vars))
        .collect();
    let source = |i: usize| {
        SdsSource::Delta(Box::new(SdsSource::EnvoyGrpc {
            uds_path: pods[i].0.clone(),
        }))
    };
    let mesh = Mesh::start_with(source(0), source(1), "ok", || {
        agents
            .iter()
            .map(Agent::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    })
    .await;
    rotations_and_restart(&mesh, &mut agents, |agents| {
        for (i, (socket, vars)) in pods.iter().enumerate() {
            let st = agents[i].terminate();
            assert!(st.success(), "{}", agents[i].log());
            agents[i] = Agent::start_at(socket, dir.path(), vars);
        }
    })
    .await;
}

//! The SDS service in process, under paused tokio time: the real router on a
//! temporary Unix socket, a secret manager on the fake CA of
//! [`crate::secrets::test_support`] (certificates and JWTs follow the paused
//! clock), and a tonic client over the socket. A day of renewals takes
//! milliseconds.
//!
//! - [`acks`]: ACK, NACK and stale nonces, `StreamSecrets` and `DeltaSecrets`;
//! - [`rotation`]: a renewal pushed to open streams, at its time and not before;
//! - [`credentials`]: a stream ends at its JWT's `exp`, and when the CA
//!   rejects its JWT at a renewal;
//! - [`delta_protocol`]: `DeltaSecrets` subscriptions on one stream: unknown
//!   names removed, unsubscribe, a reconnect's versions, one cache for both
//!   protocols;
//! - [`refusals`]: a missing or unparsable credential, an unknown name, a
//!   wrong type, each with its status; the header spellings accepted;
//! - [`bounds`]: the stream caps, `SDS_MAX_RESOURCE_NAMES`,
//!   `SDS_MAX_REQUEST_BYTES`, `SDS_FIRST_REQUEST_TIMEOUT`,
//!   `SDS_CONNECTION_NEW_JWT_BURST`;
//! - [`half_close`]: a half-closed stream is answered, then ends; a client
//!   leaving while its first fetch waits takes its stream with it;
//! - [`federated`]: `ALL` serves every trust domain, and pushes a change of
//!   the federated roots, which `default` and `ROOTCA` streams never see.
//!
//! What the agent logs is captured ([`Agent::log`]), at `info` as the binary
//! logs by default: the server's tasks run on the test's thread.
//!
//! Paused time with real sockets: tokio advances paused time on its own
//! whenever every task waits, socket reads included. Server, client and CA
//! share one thread, so bytes written are readable at once and the clock only
//! jumps when nothing is left to do (a blocking task, such as the manager's
//! key generation, holds it too); still, every deadline that is not under
//! test (first request, keep-alive) is days away, and tests move time with
//! [`tokio::time::advance`] where the time matters.

mod acks;
mod bounds;
mod credentials;
mod delta_protocol;
mod federated;
mod half_close;
mod refusals;
mod rotation;
mod unproven;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::resources::SECRET_TYPE_URL;
use crate::clock::Clock;
use crate::config::SdsLimits;
use crate::crypto::{cert_summary, KeyType};
use crate::endpoint::limits::Limits;
use crate::endpoint::CREDENTIAL_HEADER;
use crate::identity::Credential;
use crate::secrets::schedule::RenewPolicy;
pub(super) use crate::secrets::test_support::{jwt, Call, FakeCa};
use crate::secrets::ManagerOptions;

/// Certificates live an hour and are renewed at half their life, no jitter.
pub(super) const TTL: Duration = Duration::from_secs(3600);
pub(super) const RENEWAL: Duration = Duration::from_secs(1800);
/// Far enough to never come during a test.
pub(super) const NEVER: Duration = Duration::from_secs(30 * 86400);
/// How long (paused time) a test waits for a message that must come.
const WAIT: Duration = Duration::from_secs(60);
/// How long (paused time) a stream must stay silent to be called silent.
pub(super) const QUIET: Duration = Duration::from_secs(5);

pub(super) type Client = SecretDiscoveryServiceClient<Channel>;

/// An agent serving SDS on a temporary socket.
pub(super) struct Agent {
    pub ca: Arc<FakeCa>,
    /// The trust bundle the streams serve (federated roots are set here).
    pub trust: Arc<crate::trust::TrustBundle>,
    pub limits: Arc<Limits>,
    pub clock: Clock,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    /// Held: the server stops when it is dropped.
    _shutdown: watch::Sender<bool>,
    log: Log,
    /// Held: the log is captured on this thread until it is dropped.
    _logging: tracing::subscriber::DefaultGuard,
}

/// Log lines as written, shared with the subscriber that writes them.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The bounds of the agent's tests: the defaults, except that deadlines no
/// test is about never come.
pub(super) fn test_limits() -> SdsLimits {
    SdsLimits {
        first_request_timeout: NEVER,
        keepalive_interval: NEVER,
        keepalive_timeout: NEVER,
        ..SdsLimits::default()
    }
}

impl Agent {
    /// An agent within [`test_limits`], changed by `f`.
    pub async fn start(f: impl FnOnce(&mut SdsLimits)) -> Self {
        let log = Log::default();
        let writer = log.clone();
        let logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_max_level(tracing::Level::INFO)
                .with_ansi(false)
                .with_target(false)
                .without_time()
                .finish(),
        );
        let mut cfg = test_limits();
        f(&mut cfg);
        let clock = Clock::paused_at(SystemTime::now());
        let ca = FakeCa::new(clock);
        let mut opts = ManagerOptions::new("td", KeyType::EcP256, TTL);
        opts.clock = clock;
        opts.renew = RenewPolicy {
            grace_ratio: 0.5,
            jitter: 0.0,
        };
        let (manager, trust) = crate::secrets::test_support::manager_and_trust(ca.clone(), opts);
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds.sock");
        let listener = crate::endpoint::socket::bind(&socket, Default::default()).unwrap();
        let limits = Limits::new(cfg);
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(super::serve_within(
            listener,
            manager,
            None,
            limits.clone(),
            rx,
        ));
        Self {
            ca,
            trust,
            limits,
            clock,
            socket,
            _dir: dir,
            _shutdown: shutdown,
            log,
            _logging: logging,
        }
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.0.lock().unwrap()).into_owned()
    }

    /// A client on a connection of its own.
    pub async fn client(&self) -> Client {
        let path = self.socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .expect("connect to the agent's socket");
        SecretDiscoveryServiceClient::new(channel)
    }

    /// Unix time `secs` from now, by the agent's clock.
    pub fn unix_in(&self, secs: i64) -> i64 {
        self.clock.unix_now() + secs
    }
}

/// Waits (in paused time, yielding) until `f` holds; panics saying `what`
/// after `within`.
pub(super) async fn eventually(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One open stream, from the client's side.
pub(super) struct Stream<Req, Resp> {
    tx: Option<mpsc::Sender<Req>>,
    rx: tonic::Streaming<Resp>,
}

pub(super) type Sotw = Stream<DiscoveryRequest, DiscoveryResponse>;
pub(super) type Delta = Stream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

fn with_jwt<T>(msg: T, jwt: &Credential) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert_bin(
        CREDENTIAL_HEADER,
        tonic::metadata::MetadataValue::from_bytes(jwt.expose().as_bytes()),
    );
    req
}

/// The client's side of a request stream, as a request carrying `jwt`, or
/// no credential at all.
fn requests<Req>(
    jwt: Option<&Credential>,
) -> (mpsc::Sender<Req>, tonic::Request<ReceiverStream<Req>>) {
    let (tx, rx) = mpsc::channel(8);
    let body = ReceiverStream::new(rx);
    let req = match jwt {
        Some(jwt) => with_jwt(body, jwt),
        None => tonic::Request::new(body),
    };
    (tx, req)
}

/// Opens a `StreamSecrets` stream carrying `jwt`; `Err` when refused.
pub(super) async fn open_sotw(client: &mut Client, jwt: &Credential) -> Result<Sotw, Status> {
    open_sotw_with(client, Some(jwt)).await
}

/// Opens a `StreamSecrets` stream carrying `jwt`, or no credential at all;
/// `Err` when refused.
pub(super) async fn open_sotw_with(
    client: &mut Client,
    jwt: Option<&Credential>,
) -> Result<Sotw, Status> {
    let (tx, req) = requests(jwt);
    let rx = client.stream_secrets(req).await?.into_inner();
    Ok(Stream { tx: Some(tx), rx })
}

/// Opens a `DeltaSecrets` stream carrying `jwt`; `Err` when refused.
pub(super) async fn open_delta(client: &mut Client, jwt: &Credential) -> Result<Delta, Status> {
    open_delta_with(client, Some(jwt)).await
}

/// Opens a `DeltaSecrets` stream carrying `jwt`, or no credential at all;
/// `Err` when refused.
pub(super) async fn open_delta_with(
    client: &mut Client,
    jwt: Option<&Credential>,
) -> Result<Delta, Status> {
    let (tx, req) = requests(jwt);
    let rx = client.delta_secrets(req).await?.into_inner();
    Ok(Stream { tx: Some(tx), rx })
}

/// `FetchSecrets` for `names`, carrying `jwt`.
pub(super) async fn fetch(
    client: &mut Client,
    names: &[&str],
    jwt: &Credential,
) -> Result<DiscoveryResponse, Status> {
    let resp = client
        .fetch_secrets(with_jwt(request(names, None), jwt))
        .await?;
    Ok(resp.into_inner())
}

impl<Req, Resp: Message + Default + std::fmt::Debug + 'static> Stream<Req, Resp> {
    pub async fn send(&self, req: Req) {
        let sent = self.tx.as_ref().expect("not half-closed").send(req).await;
        assert!(sent.is_ok(), "the client's request stream is gone");
    }

    /// Half-closes: the client sends no more requests.
    pub fn half_close(&mut self) {
        self.tx = None;
    }

    /// The next message, or the status the stream ended with; panics when
    /// nothing comes within [`WAIT`] or the stream ends without a status.
    pub async fn next(&mut self) -> Result<Resp, Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(msg))) => Ok(msg),
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("nothing on the stream within {WAIT:?}"),
        }
    }

    /// The next message; panics on a status.
    pub async fn response(&mut self) -> Resp {
        self.next().await.expect("a response, not a status")
    }

    /// The status the stream ends with next; panics on a message.
    pub async fn status(&mut self) -> Status {
        match self.next().await {
            Ok(_) => panic!("a message came where the stream was to end"),
            Err(status) => status,
        }
    }

    /// Waits for the stream to end with OK; panics on a message or a status.
    pub async fn ends_ok(&mut self) {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(None)) => {}
            Ok(got) => panic!("expected the end, got {got:?}"),
            Err(_) => panic!("the stream did not end within {WAIT:?}"),
        }
    }

    /// Panics if anything (a message, a status, the end) comes within `d`.
    pub async fn silent(&mut self, d: Duration, what: &str) {
        if let Ok(got) = tokio::time::timeout(d, self.rx.message()).await {
            let got = got.map(|m| m.map(|m| format!("{:.200}", format!("{m:?}"))));
            panic!("{what}: expected nothing within {d:?}, got {got:?}");
        }
    }
}

/// A `StreamSecrets` request for `names`, echoing `ack_of`'s version and nonce.
pub(super) fn request(names: &[&str], ack_of: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        version_info: ack_of.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: ack_of.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// Rejection of a response, as Envoy says it.
pub(super) fn nack_detail() -> Option<RpcStatus> {
    Some(RpcStatus {
        code: Code::InvalidArgument as i32,
        message: "Failed to load certificate chain from <inline>".into(),
        ..Default::default()
    })
}

/// A `DeltaSecrets` request subscribing `names` and answering `nonce`.
pub(super) fn delta_request(names: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn decode(any: &Any) -> Secret {
    assert_eq!(any.type_url, SECRET_TYPE_URL);
    Secret::decode(any.value.as_slice()).unwrap()
}

/// The serial of the leaf in a `default` secret; panics on another one.
fn leaf_serial(s: &Secret) -> String {
    let Some(secret::Type::TlsCertificate(tls)) = &s.r#type else {
        panic!("expected a tls_certificate, got {:?}", s.name);
    };
    let pem = match tls
        .certificate_chain
        .as_ref()
        .and_then(|d| d.specifier.as_ref())
    {
        Some(Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    };
    cert_summary(&pem).expect("a certificate").1
}

/// Names of the secrets of a `StreamSecrets` response, in order.
pub(super) fn names(resp: &DiscoveryResponse) -> Vec<String> {
    resp.resources.iter().map(|a| decode(a).name).collect()
}

/// The serial of the `default` certificate a `StreamSecrets` response carries.
pub(super) fn serial(resp: &DiscoveryResponse) -> String {
    let secrets: Vec<Secret> = resp.resources.iter().map(decode).collect();
    let default = secrets
        .iter()
        .find(|s| s.name == "default")
        .expect("the response carries default");
    leaf_serial(default)
}

/// Names of the resources of a `DeltaSecrets` response, in order.
pub(super) fn delta_names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    resp.resources.iter().map(|r| r.name.clone()).collect()
}

/// The serial of the `default` certificate a `DeltaSecrets` response carries.
pub(super) fn delta_serial(resp: &DeltaDiscoveryResponse) -> String {
    let r = resp
        .resources
        .iter()
        .find(|r| r.name == "default")
        .expect("the response carries default");
    leaf_serial(&decode(r.resource.as_ref().expect("a resource")))
}

/// The secret named `name` a `StreamSecrets` response carries.
pub(super) fn secret_named(resp: &DiscoveryResponse, name: &str) -> Secret {
    resp.resources
        .iter()
        .map(decode)
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("the response carries no {name}"))
}

/// The secret named `name` a `DeltaDiscoveryResponse` carries.
pub(super) fn delta_secret_named(resp: &DeltaDiscoveryResponse, name: &str) -> Secret {
    let r = resp
        .resources
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("the response carries no {name}"));
    decode(r.resource.as_ref().expect("a resource"))
}

/// The chain and key PEMs of a `default` secret.
pub(super) fn chain_and_key(s: &Secret) -> (String, String) {
    let c = crate::client::sds::tls_certificate(s).expect("a tls_certificate");
    (c.chain_pem, c.key_pem.to_string())
}

/// The trusted CA PEM of a `ROOTCA` secret.
pub(super) fn trusted_ca(s: &Secret) -> String {
    crate::client::sds::trusted_ca(s).expect("a validation_context")
}

/// The URI SANs of the leaf of a `default` secret.
pub(super) fn uris(s: &Secret) -> Vec<String> {
    crate::client::sds::leaf_facts(&chain_and_key(s).0)
        .expect("a leaf certificate")
        .uri_sans
}

/// The URI SANs of the leaf a `StreamSecrets` response serves first, which
/// must come with its private key.
pub(super) fn served_uris(resp: &DiscoveryResponse) -> Vec<String> {
    crate::client::sds::served_uris(resp).expect("a certificate and its key")
}

/// `true` when `status` has `code` and its message contains `text`.
pub(super) fn is(status: &Status, code: Code, text: &str) -> bool {
    status.code() == code && status.message().contains(text)
}

//! Two trust domains, `cluster.local` and `other.example`, each with its own
//! OpenBao (PKI mount, auth role), node-agent and `node-agent
//! bundle-endpoint`; each agent federates with the other through the other's
//! bundle endpoint (`https_web`). Real Envoys take `ALL` and do mTLS across
//! the domains; a certificate naming `other.example` but signed by
//! `cluster.local`'s CA is refused; `other.example`'s root rotates while
//! requests run; the Workload API shows the federated bundle to py-spiffe
//! and the Rust `spiffe` crate; a bundle endpoint that goes down leaves the
//! last good bundle served.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node_agent::crypto::{is_issued_by, split_pem_certs};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::agent::Agent;
use support::bundle_server::loopback_tls;
use support::envoy::*;
use support::mesh::SERVER_ID;
use support::metrics::scrape;
use support::sds_client::{connect, fetch, secrets, tls_certificate};
use support::vault_env::VaultEnv;

use crate::root_rotation::{
    fresh_handshake_client_config, make_default, new_root, serial_of, token_source, Traffic,
};

const READY: Duration = Duration::from_secs(60);
const OTHER: &str = "other.example";
/// The client: `sleep` in `other.example`.
const FOREIGN_CLIENT_ID: &str = "spiffe://other.example/ns/default/sa/sleep";
/// What the bundle endpoints tell the agents: read again after 2 s.
const HINT_SECS: u64 = 2;

/// `node-agent bundle-endpoint` for one domain's Vault, on HTTPS with a
/// certificate from a test CA.
struct BundleEndpoint {
    child: Child,
    url: String,
    ca_file: PathBuf,
    log: PathBuf,
}

impl Drop for BundleEndpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BundleEndpoint {
    async fn start(env: &VaultEnv, dir: &Path, name: &str) -> BundleEndpoint {
        let (ca_pem, cert, key) = loopback_tls();
        let file = |n: &str, text: String| {
            let path = dir.join(format!("{name}-{n}"));
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca_file = file("endpoint-ca.pem", ca_pem);
        let cert_file = file("endpoint.pem", cert.pem());
        let key_file = file("endpoint-key.pem", key.serialize_pem());
        let port = free_port();
        let log = dir.join(format!("{name}-bundle-endpoint.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_node-agent"));
        cmd.arg("bundle-endpoint")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "info")
            .env("VAULT_ADDR", env.bao.addr())
            .env("VAULT_SIGN_CSR_PATH", "istio_ca/sign/istio-pki-role")
            .env("VAULT_TLS_ROOT_CERT", env.bao.ca_pem_path())
            .env("TRUST_REFRESH_INTERVAL", "1s")
            .env("BUNDLE_ENDPOINT_ADDR", format!("127.0.0.1:{port}"))
            .env("BUNDLE_ENDPOINT_CERT", &cert_file)
            .env("BUNDLE_ENDPOINT_KEY", &key_file)
            .env("BUNDLE_ENDPOINT_REFRESH_HINT", format!("{HINT_SECS}s"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let endpoint = BundleEndpoint {
            child: cmd.spawn().unwrap(),
            url: format!("https://127.0.0.1:{port}/"),
            ca_file,
            log,
        };
        let http = endpoint.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(&endpoint.url).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the bundle endpoint never served; log:\n{}",
                endpoint.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        endpoint
    }

    fn client(&self) -> reqwest::Client {
        let ca = std::fs::read(&self.ca_file).unwrap();
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The federation file naming this endpoint as `td`'s source.
    fn federation_file(&self, dir: &Path, td: &str) -> PathBuf {
        let path = dir.join(format!("federation-{td}.json"));
        let cfg = json!({"trust_domains": {td: {
            "bundle_endpoint_url": self.url,
            "bundle_endpoint_profile": "https_web",
            "ca_file": self.ca_file,
        }}});
        std::fs::write(&path, cfg.to_string()).unwrap();
        path
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// tests/pyspiffe/check.py's `bundles` mode on `socket`.
fn py_spiffe_bundles(socket: &Path, agent: &Agent) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pyspiffe/check.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("bundles")
        .arg(socket)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "py-spiffe failed ({}):\n{stdout}\n{}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `cfg` with every SDS validation context named `ALL` instead of `ROOTCA`.
fn with_all(mut cfg: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Object(sds)) = m.get_mut("validation_context_sds_secret_config")
                {
                    sds.insert("name".into(), json!("ALL"));
                }
                m.values_mut().for_each(walk);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut cfg);
    cfg
}

/// The federated trust domain's roots and freshness, from an agent's `/metrics`.
async fn federated(agent: &Agent, td: &str) -> (f64, f64) {
    let m = scrape(&agent.status_url("/metrics"), "prometheus").await;
    let l = [("trust_domain", td)];
    (
        m.get("node_agent_federation_bundle_roots", &l),
        m.get("node_agent_federation_bundle_fresh", &l),
    )
}

async fn until(
    what: &str,
    within: Duration,
    logs: impl Fn() -> String,
    mut done: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federate_through_their_bundle_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let local = VaultEnv::start().await;
    let other = VaultEnv::start_opts(|o| o.trust_domain = OTHER.into()).await;
    let local_endpoint = BundleEndpoint::start(&local, dir.path(), "local").await;
    let other_endpoint = BundleEndpoint::start(&other, dir.path(), "other").await;

    let common = [
        ("FEDERATION_REFRESH_MIN", "1s"),
        ("TRUST_REFRESH_INTERVAL", "1s"),
        ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0"),
    ];
    let local_fed = other_endpoint.federation_file(dir.path(), OTHER);
    let other_fed = local_endpoint.federation_file(dir.path(), "cluster.local");
    let api_socket = dir.path().join("api").join("workload.sock");
    let api_token = dir.path().join("api-token");
    std::fs::write(&api_token, local.jwt("default", "httpbin")).unwrap();
    let mut local_vars = common.to_vec();
    local_vars.extend([
        ("FEDERATION_CONFIG", local_fed.to_str().unwrap()),
        ("WORKLOAD_API_SOCKET", api_socket.to_str().unwrap()),
        ("WORKLOAD_TOKEN_PATH", api_token.to_str().unwrap()),
    ]);
    let local_agent = Agent::started(&local.agent_env_with(&local_vars)).await;
    let mut other_vars = common.to_vec();
    other_vars.extend([
        ("FEDERATION_CONFIG", other_fed.to_str().unwrap()),
        ("TRUST_DOMAIN", OTHER),
        ("SECRET_TTL", "20s"),
        ("TRUST_ROOT_RETENTION", "20s"),
    ]);
    let other_agent = Agent::started(&other.agent_env_with(&other_vars)).await;
    let logs = || {
        format!(
            "--- cluster.local agent ---\n{}\n--- other.example agent ---\n{}\n\
             --- cluster.local bundle endpoint ---\n{}\n--- other.example bundle endpoint ---\n{}",
            local_agent.log(),
            other_agent.log(),
            local_endpoint.log(),
            other_endpoint.log()
        )
    };
    until(
        "each agent holds the other's bundle",
        READY,
        logs,
        async || {
            federated(&local_agent, OTHER).await == (1.0, 1.0)
                && federated(&other_agent, "cluster.local").await == (1.0, 1.0)
        },
    )
    .await;

    // httpbin in cluster.local serves sleep of other.example: each Envoy
    // anchors the other's certificate in the other domain's roots (ALL).
    let (server_port, client_port, intruder_port) = (free_port(), free_port(), free_port());
    let (backend, _backend) = start_backend("across the domains").await;
    let server_sds = token_source(
        dir.path(),
        "server",
        &local.jwt("default", "httpbin"),
        &local_agent.socket,
    );
    let server = EnvoyProc::start(&with_all(server_config(
        &server_sds,
        server_port,
        backend,
        FOREIGN_CLIENT_ID,
    )))
    .await
    .unwrap();
    let client_sds = token_source(
        dir.path(),
        "client",
        &other.jwt("default", "sleep"),
        &other_agent.socket,
    );
    let client = EnvoyProc::start(&with_all(fresh_handshake_client_config(
        &client_sds,
        client_port,
        server_port,
    )))
    .await
    .unwrap();
    for e in [&server, &client] {
        e.wait_ready(READY)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    }
    let resp = reqwest::get(format!("http://127.0.0.1:{client_port}/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", logs());
    assert_eq!(
        resp.headers()[HDR_SERVER_SAW_CLIENT_URI].to_str().unwrap(),
        FOREIGN_CLIENT_ID
    );
    assert_eq!(
        resp.headers()[HDR_CLIENT_SAW_SERVER_URI].to_str().unwrap(),
        SERVER_ID
    );
    assert_eq!(resp.text().await.unwrap(), "across the domains");

    // An intruder: a certificate for the same other.example name, signed by
    // cluster.local's CA (its agent asks cluster.local's Vault for
    // other.example names). Its Envoy trusts the server (ROOTCA), but the
    // server anchors other.example in other.example's roots only.
    let intruder_agent = Agent::started(&local.agent_env_with(&[("TRUST_DOMAIN", OTHER)])).await;
    let intruder_sds = token_source(
        dir.path(),
        "intruder",
        &local.jwt("default", "sleep"),
        &intruder_agent.socket,
    );
    let intruder = EnvoyProc::start(&fresh_handshake_client_config(
        &intruder_sds,
        intruder_port,
        server_port,
    ))
    .await
    .unwrap();
    intruder.wait_ready(READY).await.unwrap();
    assert_eq!(
        leaf_certs(&intruder.certs().await)
            .first()
            .map(|l| l.0.clone()),
        Some(FOREIGN_CLIENT_ID.to_string()),
        "the intruder holds a certificate for the foreign name"
    );
    let refused = reqwest::get(format!("http://127.0.0.1:{intruder_port}/"))
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        503,
        "the intruder was not refused\n{}",
        logs()
    );

    // other.example rotates its root while requests run: a new root (not
    // yet signing) reaches cluster.local's agent through the bundle
    // endpoint within the refresh hints, then becomes the default issuer;
    // the client's next certificates chain to it, and no request fails.
    let traffic = Traffic::start(client_port, Duration::from_millis(100));
    let added = Instant::now();
    let (new_issuer, new_root_pem) = new_root(&other).await;
    until(
        "the new root of other.example reaches cluster.local",
        Duration::from_secs(20),
        logs,
        async || federated(&local_agent, OTHER).await.0 == 2.0,
    )
    .await;
    let took = added.elapsed();
    // The endpoint reads the mount every 1 s and the agent the endpoint
    // every HINT_SECS: both within a few seconds, whatever the load.
    assert!(
        took < Duration::from_secs(HINT_SECS + 1 + 5),
        "took {took:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    make_default(&other, &new_issuer).await;
    let before = leaf_certs(&client.certs().await)[0].1.clone();
    until(
        "the client's certificate renews from the new root",
        Duration::from_secs(40),
        logs,
        async || leaf_certs(&client.certs().await)[0].1 != before,
    )
    .await;
    // The certificate the client's Envoy holds is the agent's cached one.
    let mut sds = connect(&other_agent.socket).await;
    let resp = fetch(&mut sds, &["default"], &other.jwt("default", "sleep"))
        .await
        .unwrap();
    let (chain, _) = tls_certificate(&secrets(&resp)[0]);
    let leaf = &split_pem_certs(&chain).unwrap()[0];
    assert_eq!(
        serial_of(leaf),
        leaf_certs(&client.certs().await)[0].1,
        "the agent's certificate is not the Envoy's"
    );
    assert!(
        is_issued_by(leaf, &new_root_pem),
        "the renewed certificate does not chain to other.example's new root"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        traffic.failures().is_empty(),
        "requests failed during other.example's root rotation: {:?}\n{}",
        traffic.failures(),
        logs()
    );

    // The Workload API gives both trust domains to py-spiffe and to the
    // Rust spiffe crate, other.example with both its roots as its bundle
    // endpoint publishes them.
    let published = other_endpoint
        .client()
        .get(&other_endpoint.url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let published = node_agent::trust::spiffe_bundle::parse(&published).unwrap();
    assert_eq!(published.roots.len(), 2);
    let digests = |ders: Vec<&[u8]>| -> Vec<String> {
        let mut v: Vec<String> = ders.into_iter().map(|d| hex(&Sha256::digest(d))).collect();
        v.sort();
        v
    };
    let want_other = digests(published.roots.iter().map(Vec::as_slice).collect());
    let py = py_spiffe_bundles(&api_socket, &local_agent);
    for call in ["fetch_x509_bundles", "fetch_x509_svid"] {
        assert_eq!(py[call][OTHER], json!(want_other), "py-spiffe {call}: {py}");
        assert_eq!(
            py[call]["cluster.local"].as_array().map(Vec::len),
            Some(1),
            "{py}"
        );
    }
    let rust = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", api_socket.display()))
        .await
        .unwrap();
    let td = spiffe::TrustDomain::new(OTHER).unwrap();
    let from_bundles = rust.fetch_x509_bundles().await.unwrap();
    let from_svid = rust.fetch_x509_context().await.unwrap();
    for (call, set) in [
        ("fetch_x509_bundles", std::sync::Arc::new(from_bundles)),
        ("fetch_x509_context", from_svid.bundle_set().clone()),
    ] {
        let b = set
            .get(&td)
            .unwrap_or_else(|| panic!("the spiffe crate's {call} has no {OTHER}"));
        let got = digests(b.authorities().iter().map(|c| c.as_ref()).collect());
        assert_eq!(got, want_other, "the spiffe crate's {call}");
    }

    // other.example's bundle endpoint goes down: cluster.local's agent says
    // so and keeps serving the last good bundle; requests go on.
    drop(other_endpoint);
    local_agent
        .log_shows(
            "cannot read the bundle of other.example",
            Duration::from_secs(20),
        )
        .await;
    assert!(local_agent
        .log()
        .contains("keeping its last good bundle (2 roots)"));
    assert_eq!(federated(&local_agent, OTHER).await, (2.0, 0.0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(traffic.failures().is_empty(), "{:?}", traffic.failures());
    drop(traffic);
}

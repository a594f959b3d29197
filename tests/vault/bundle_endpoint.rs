//! `node-agent bundle-endpoint` against a real OpenBao: the mount's roots
//! served as a SPIFFE bundle over HTTPS (checked field by field, and by
//! PyJWT's JWK Set parser and py-spiffe), a new root issuer served within the
//! refresh interval with a higher sequence, the last good bundle kept with
//! OpenBao stopped, 503 before the first read, and the TLS certificate
//! re-read when it changes on disk. No Vault token is given to the endpoint.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};

use node_agent::trust::spiffe_bundle;

use crate::support::agent::Agent;
use crate::support::bao::Bao;
use crate::support::ports::free_port;

const MOUNT: &str = "bundle_pki";
/// BUNDLE_ENDPOINT_REFRESH_HINT in these tests: not the default.
const HINT_SECS: u64 = 42;

/// The endpoint's TLS: a test CA and a leaf for 127.0.0.1 it signed.
struct TestTls {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestTls {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bundle endpoint test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Self { ca, ca_key }
    }

    /// Writes a new leaf and its key to `dir/tls.crt` and `dir/tls.key`;
    /// returns the leaf's DER.
    fn write_leaf(&self, dir: &Path) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bundle-endpoint.test");
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(self.ca.der(), &self.ca_key).unwrap();
        let leaf = params.signed_by(&key, &issuer).unwrap();
        // The key first, so that a reader never sees the new certificate
        // with the old key for long.
        std::fs::write(dir.join("tls.key.new"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("tls.crt.new"), leaf.pem()).unwrap();
        std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
        std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
        leaf.der().to_vec()
    }

    /// A client trusting only the test CA.
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap())
            .tls_info(true)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }
}

/// A running endpoint and what it was started with.
struct Endpoint {
    agent: Agent,
    url: String,
    tls: TestTls,
    dir: tempfile::TempDir,
}

impl Endpoint {
    /// Starts `node-agent bundle-endpoint` reading `MOUNT` at `vault_addr`
    /// every second, with no Vault token.
    fn start(vault_addr: &str, vault_ca: &Path) -> Endpoint {
        let dir = tempfile::tempdir().unwrap();
        let tls = TestTls::new();
        tls.write_leaf(dir.path());
        let port = free_port();
        let env = [
            ("VAULT_ADDR", vault_addr.to_string()),
            ("VAULT_TLS_ROOT_CERT", vault_ca.display().to_string()),
            ("VAULT_PKI_MOUNT", MOUNT.to_string()),
            ("TRUST_REFRESH_INTERVAL", "1s".to_string()),
            ("BUNDLE_ENDPOINT_ADDR", format!("127.0.0.1:{port}")),
            (
                "BUNDLE_ENDPOINT_CERT",
                dir.path().join("tls.crt").display().to_string(),
            ),
            (
                "BUNDLE_ENDPOINT_KEY",
                dir.path().join("tls.key").display().to_string(),
            ),
            ("BUNDLE_ENDPOINT_REFRESH_HINT", format!("{HINT_SECS}s")),
        ];
        let agent = Agent::spawn_args(
            &dir.path().join("unused.sock"),
            dir.path(),
            &env,
            &["bundle-endpoint"],
        );
        Endpoint {
            agent,
            url: format!("https://127.0.0.1:{port}/"),
            tls,
            dir,
        }
    }

    /// GET `/`: status, Content-Type, body, and the server's leaf (DER).
    async fn get(&self) -> Option<(u16, String, Vec<u8>, Vec<u8>)> {
        let resp = self.tls.client().get(&self.url).send().await.ok()?;
        let status = resp.status().as_u16();
        let leaf = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp.bytes().await.ok()?.to_vec();
        Some((status, ctype, body, leaf))
    }

    /// Polls GET until `pred` holds for an answer; panics with the log after `within`.
    async fn until(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&(u16, String, Vec<u8>, Vec<u8>)) -> bool,
    ) -> (u16, String, Vec<u8>, Vec<u8>) {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < within {
            if let Some(a) = self.get().await {
                if pred(&a) {
                    return a;
                }
                last = Some((a.0, String::from_utf8_lossy(&a.2).into_owned()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "{what}: not within {within:?}; last answer {last:?}\n--- endpoint log\n{}",
            self.agent.log()
        );
    }

    async fn bundle(&self, within: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let (_, _, body, _) = self
            .until(within, what, |a| {
                a.0 == 200 && serde_json::from_slice(&a.2).is_ok_and(|v| pred(&v))
            })
            .await;
        serde_json::from_slice(&body).unwrap()
    }
}

/// A PKI mount `MOUNT` with one EC root; returns its issuer's certificate (DER).
async fn pki_mount(bao: &Bao) -> Vec<u8> {
    bao.root(
        Method::POST,
        &format!("sys/mounts/{MOUNT}"),
        Some(json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}})),
    )
    .await
    .unwrap();
    let answer = bao
        .root(
            Method::POST,
            &format!("{MOUNT}/root/generate/internal"),
            Some(json!({"common_name": "root-1.test", "key_type": "ec", "ttl": "87600h", "issuer_name": "root-1"})),
        )
        .await
        .unwrap();
    pem_der(answer["data"]["certificate"].as_str().unwrap())
}

fn pem_der(pem: &str) -> Vec<u8> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .contents
}

fn x5c_der(key: &Value) -> Vec<u8> {
    let x5c = key["x5c"].as_array().expect("x5c is an array");
    assert_eq!(x5c.len(), 1, "x5c holds exactly one certificate: {key}");
    STANDARD
        .decode(x5c[0].as_str().expect("x5c[0] is a string"))
        .expect("x5c[0] is standard base64 DER")
}

/// The SPIFFE Trust Domain and Bundle specification's rules for an X.509
/// bundle, field by field; returns the roots in the order served.
fn check_spec(bundle: &Value) -> Vec<Vec<u8>> {
    assert!(
        bundle["spiffe_sequence"].is_u64(),
        "spiffe_sequence is an unsigned integer: {bundle}"
    );
    assert_eq!(
        bundle["spiffe_refresh_hint"].as_u64(),
        Some(HINT_SECS),
        "spiffe_refresh_hint is BUNDLE_ENDPOINT_REFRESH_HINT in seconds: {bundle}"
    );
    let keys = bundle["keys"].as_array().expect("keys is an array");
    assert!(!keys.is_empty(), "an X.509 bundle has a key: {bundle}");
    keys.iter()
        .map(|k| {
            assert_eq!(k["use"], "x509-svid", "{k}");
            match k["kty"].as_str() {
                Some("EC") => {
                    for f in ["crv", "x", "y"] {
                        assert!(k[f].is_string(), "an EC key has {f}: {k}");
                    }
                    assert!(k.get("n").is_none() && k.get("d").is_none(), "{k}");
                }
                Some("RSA") => {
                    for f in ["n", "e"] {
                        assert!(k[f].is_string(), "an RSA key has {f}: {k}");
                    }
                    assert!(k.get("d").is_none() && k.get("p").is_none(), "{k}");
                }
                other => panic!("kty {other:?} is EC or RSA: {k}"),
            }
            x5c_der(k)
        })
        .collect()
}

/// Parses `json` with third-party code: PyJWT's JWK Set parser (which
/// py-spiffe uses for JWT bundles) reads every key's parameters, which must
/// be its x5c certificate's public key as `cryptography` reads it, and
/// py-spiffe's `X509Bundle.parse_raw` takes the certificates as the trust
/// domain's authorities. Returns how many authorities py-spiffe holds.
fn third_party_parse(json: &[u8]) -> usize {
    const SCRIPT: &str = r#"
import base64, json, sys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from jwt import PyJWKSet
from spiffe.bundle.x509_bundle.x509_bundle import X509Bundle
from spiffe.spiffe_id.spiffe_id import TrustDomain

raw = sys.stdin.read()
doc = json.loads(raw)
jwks = PyJWKSet.from_json(raw)
assert len(jwks.keys) == len(doc["keys"]), (len(jwks.keys), len(doc["keys"]))
spki = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
ders = b""
for jwk, entry in zip(jwks.keys, doc["keys"]):
    der = base64.b64decode(entry["x5c"][0], validate=True)
    cert = x509.load_der_x509_certificate(der)
    assert spki(jwk.key) == spki(cert.public_key()), "JWK parameters are not the x5c key"
    ders += der
bundle = X509Bundle.parse_raw(TrustDomain("cluster.local"), ders)
print(len(bundle.x509_authorities))
"#;
    use std::io::Write as _;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (the peers virtualenv: ./test.sh puts it on PATH)");
    child.stdin.take().unwrap().write_all(json).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "PyJWT / py-spiffe refused the bundle: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(json)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_mounts_roots_as_a_spiffe_bundle_through_rotation_and_outage() {
    let mut bao = Bao::start_tls().await.expect("start OpenBao");
    let root1 = pki_mount(&bao).await;
    let ep = Endpoint::start(&bao.addr(), &bao.ca_pem_path());
    let within = Duration::from_secs(30);

    // The mount's root, as the specification writes it.
    let (status, ctype, body, _) = ep.until(within, "the first bundle", |a| a.0 == 200).await;
    assert_eq!((status, ctype.as_str()), (200, "application/json"));
    let first: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(check_spec(&first), vec![root1.clone()], "{first}");
    let parsed = spiffe_bundle::parse(&body).expect("spiffe_bundle::parse");
    assert_eq!(parsed.roots, vec![root1.clone()]);
    assert_eq!(parsed.refresh_hint, Some(Duration::from_secs(HINT_SECS)));
    assert_eq!(third_party_parse(&body), 1);
    let seq1 = first["spiffe_sequence"].as_u64().unwrap();

    // A root rotation's first step: a second (RSA) root issuer in the mount.
    let answer = bao
        .root(
            Method::POST,
            &format!("{MOUNT}/root/rotate/internal"),
            Some(json!({"common_name": "root-2.test", "key_type": "rsa", "ttl": "87600h", "issuer_name": "root-2"})),
        )
        .await
        .unwrap();
    let root2 = pem_der(answer["data"]["certificate"].as_str().unwrap());
    let rotated_at = Instant::now();
    let second = ep
        .bundle(within, "the new root issuer served", |b| {
            b["keys"].as_array().is_some_and(|k| k.len() == 2)
        })
        .await;
    assert!(
        rotated_at.elapsed() < Duration::from_secs(5),
        "a new root is served within the 1 s refresh interval (and a poll): {:?}",
        rotated_at.elapsed()
    );
    let roots = check_spec(&second);
    assert!(roots.contains(&root1) && roots.contains(&root2), "{second}");
    let seq2 = second["spiffe_sequence"].as_u64().unwrap();
    assert!(seq2 > seq1, "spiffe_sequence increases: {seq1} then {seq2}");
    let body2 = serde_json::to_vec(&second).unwrap();
    assert_eq!(spiffe_bundle::parse(&body2).unwrap().roots.len(), 2);
    assert_eq!(third_party_parse(&body2), 2);
    let log = ep.agent.log();
    assert!(
        log.contains("bundle endpoint: added root") && log.contains("root-2.test"),
        "the new root is logged with its subject:\n{log}"
    );

    // OpenBao gone: the last good bundle is still served, and the log says why.
    bao.stop();
    ep.agent
        .log_shows(
            "still serving the last good bundle (2 root(s)",
            Duration::from_secs(30),
        )
        .await;
    let log = ep.agent.log();
    assert!(
        log.contains(&format!(
            "cannot read the roots of the PKI mount {MOUNT} at Vault"
        )),
        "the log names the mount and Vault:\n{log}"
    );
    let (status, _, body, _) = ep.get().await.expect("still answering");
    assert_eq!(status, 200);
    let during: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(during, second, "the last good bundle, unchanged");
    drop(ep.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_503_until_vault_answers_and_rereads_its_tls_certificate() {
    // Nothing listens at this Vault address.
    let dir = tempfile::tempdir().unwrap();
    let vault_ca = TestTls::new().ca.pem();
    let vault_ca_path = dir.path().join("vault-ca.pem");
    std::fs::write(&vault_ca_path, vault_ca).unwrap();
    let ep = Endpoint::start(
        &format!("https://127.0.0.1:{}", free_port()),
        &vault_ca_path,
    );
    let (status, _, body, leaf1) = ep
        .until(Duration::from_secs(30), "a 503 answer", |a| a.0 == 503)
        .await;
    assert!(
        String::from_utf8_lossy(&body).contains("no bundle yet"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(status, 503);
    ep.agent
        .log_shows(
            "answering 503 until a read succeeds",
            Duration::from_secs(10),
        )
        .await;

    // cert-manager renews the certificate: the new one is served.
    let leaf2 = ep.tls.write_leaf(ep.dir.path());
    assert_ne!(leaf1, leaf2);
    ep.until(
        Duration::from_secs(20),
        "the renewed TLS certificate",
        |a| a.3 == leaf2,
    )
    .await;
    ep.agent
        .log_shows(
            "the TLS certificate changed on disk",
            Duration::from_secs(5),
        )
        .await;
}

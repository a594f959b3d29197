//! Micro-benchmarks of the agent's hot paths, so that a change to one shows
//! its cost: key generation per key type, CSR building, checking an issued
//! chain, and encoding an SDS response (as tonic would put it on the wire).
//!
//! `cargo bench -p node-agent-bench --bench micro` (add a name to filter, e.g.
//! `-- keygen`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use prost::Message;

use node_agent::ca::local::LocalCa;
use node_agent::ca::CaClient;
use node_agent::crypto::{verify_issued, IssuedChain, KeyType, PrivateKey};
use node_agent::identity::{Credential, SpiffeId};
use node_agent::sds::resources;
use node_agent::secrets::{ManagerOptions, SecretManager};
use node_agent::trust::{TrustBundle, TrustOptions};

fn id() -> SpiffeId {
    SpiffeId("spiffe://cluster.local/ns/default/sa/httpbin".into())
}

fn keygen(c: &mut Criterion) {
    let mut g = c.benchmark_group("keygen");
    for kt in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
        if matches!(kt, KeyType::Rsa2048) {
            // Tens of milliseconds each, with a wide spread (prime search).
            g.sample_size(20).measurement_time(Duration::from_secs(10));
        }
        g.bench_function(kt.as_str(), |b| {
            b.iter(|| PrivateKey::generate(kt).expect("keygen"))
        });
    }
    g.finish();
}

fn csr(c: &mut Criterion) {
    let mut g = c.benchmark_group("csr");
    for kt in [KeyType::EcP256, KeyType::Rsa2048] {
        let key = PrivateKey::generate(kt).expect("keygen");
        g.bench_function(kt.as_str(), |b| b.iter(|| key.csr_pem(&id()).expect("csr")));
    }
    g.finish();
}

/// A chain as a CA answers it: the leaf for a fresh key, and the root.
fn issued(ca: &LocalCa, key: &PrivateKey) -> IssuedChain {
    let leaf = ca
        .sign_csr(&key.csr_pem(&id()).expect("csr"), Duration::from_secs(3600))
        .expect("sign");
    IssuedChain {
        chain_pem: vec![leaf],
        roots_pem: vec![ca.root_pem().to_string()],
    }
}

fn verify(c: &mut Criterion) {
    let ca = LocalCa::new(None, "cluster.local").expect("local CA");
    let mut g = c.benchmark_group("verify_issued");
    for kt in [KeyType::EcP256, KeyType::Rsa2048] {
        let key = PrivateKey::generate(kt).expect("keygen");
        let chain = issued(&ca, &key);
        let spki = key.public_key_der();
        g.bench_function(kt.as_str(), |b| {
            b.iter(|| verify_issued(&chain, &spki, &id(), SystemTime::now()).expect("valid chain"))
        });
    }
    g.finish();
}

/// A workload's JWT as the local CA reads it (it does not check signatures).
fn jwt() -> Credential {
    use base64::Engine;
    let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
    Credential::new(format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"RS256"}"#),
        b64(r#"{"sub":"system:serviceaccount:default:httpbin","exp":4102444800}"#)
    ))
}

fn encode(c: &mut Criterion) {
    // A cached secret and trust bundle as the agent serves them: a secret
    // manager over the local CA, one identity subscribed.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (state, _keep) = rt.block_on(async {
        let ca: Arc<dyn CaClient> =
            Arc::new(LocalCa::new(None, "cluster.local").expect("local CA"));
        let trust = TrustBundle::start(ca.clone(), TrustOptions::default()).expect("trust bundle");
        let manager = SecretManager::new(
            ca,
            trust,
            ManagerOptions::new("cluster.local", KeyType::EcP256, Duration::from_secs(3600)),
        );
        let mut sub = manager.subscribe(&jwt()).await.expect("subscribe");
        let state = sub
            .secret
            .wait_for(|s| s.secret.is_some() && !s.roots.pems.is_empty())
            .await
            .expect("a secret and roots")
            .clone();
        (state, (manager, sub))
    });
    let secret = state.secret.expect("secret");
    let snap = resources::Snapshot {
        secret: &secret,
        roots: &state.roots,
    };
    let mut g = c.benchmark_group("sds_response");
    for name in ["default", "ROOTCA"] {
        let names = resources::ResourceNames::parse(&[name.to_string()], 1).expect("one name");
        g.bench_function(format!("{name}+encode"), |b| {
            b.iter(|| resources::response(&names, &snap, "nonce-1".into()).encode_to_vec())
        });
    }
    g.finish();
}

criterion_group!(benches, keygen, csr, verify, encode);
criterion_main!(benches);

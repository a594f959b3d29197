//! Micro-benchmarks of the agent's hot paths, so that a change to one shows
//! its cost: key generation per key type, CSR building, checking an issued
//! chain, and encoding an SDS response (as tonic would put it on the wire).
//!
//! `cargo bench -p node-agent-bench --bench micro` (add a name to filter, e.g.
//! `-- keygen`).

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use prost::Message;

use node_agent::ca::local::LocalCa;
use node_agent::crypto::{verify_issued, IssuedChain, KeyType, PrivateKey};
use node_agent::identity::SpiffeId;
use node_agent::sds::resources;
use node_agent::secrets::roots::RootBundle;
use node_agent::secrets::WorkloadSecret;

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

fn encode(c: &mut Criterion) {
    let ca = LocalCa::new(None, "cluster.local").expect("local CA");
    let key = PrivateKey::generate(KeyType::EcP256).expect("keygen");
    let chain = issued(&ca, &key);
    let leaf =
        verify_issued(&chain, &key.public_key_der(), &id(), SystemTime::now()).expect("valid");
    let secret = WorkloadSecret {
        identity: id(),
        key,
        chain_pem: chain.chain_pem.concat(),
        roots: vec![(ca.root_pem().to_string(), leaf.not_after)],
        leaf,
        received: SystemTime::now(),
    };
    let roots = RootBundle {
        pems: vec![ca.root_pem().to_string()],
    };
    let snap = resources::Snapshot {
        secret: &secret,
        roots: &roots,
    };
    let mut g = c.benchmark_group("sds_response");
    for names in [vec!["default".to_string()], vec!["ROOTCA".to_string()]] {
        g.bench_function(format!("{}+encode", names[0]), |b| {
            b.iter(|| resources::response(&names, &snap, "nonce-1".into()).encode_to_vec())
        });
    }
    g.finish();
}

criterion_group!(benches, keygen, csr, verify, encode);
criterion_main!(benches);

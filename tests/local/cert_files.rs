//! Certificate files (`OUTPUT_CERTS`): they appear with the right modes,
//! each rotation replaces them, and a reader polling in a tight loop never
//! sees a key that does not match its certificate, nor a torn file.

use crate::support;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::PublicKeyData;
use support::agent::Agent;
use support::sds_client::fake_jwt;
use x509_parser::prelude::*;

const SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

/// The DER certificates of a PEM text; `None` if it is not complete.
fn certs(pem: &str) -> Option<Vec<Vec<u8>>> {
    let ders: Vec<Vec<u8>> = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|b| b.map(|b| b.contents))
        .collect::<Result<_, _>>()
        .ok()?;
    let parse_all = ders.iter().all(|d| X509Certificate::from_der(d).is_ok());
    (!ders.is_empty() && parse_all).then_some(ders)
}

/// (leaf serial, whether the key is the leaf's), or `None` for a file that is
/// not complete.
fn pair(chain_pem: &str, key_pem: &str) -> Option<(String, bool)> {
    let chain = certs(chain_pem)?;
    let leaf = X509Certificate::from_der(&chain[0]).ok()?.1;
    let key = rcgen::KeyPair::from_pem(key_pem).ok()?;
    Some((
        leaf.raw_serial_as_string(),
        key.subject_public_key_info() == leaf.public_key().raw,
    ))
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn files_appear_rotate_and_never_show_a_mismatched_key() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    fs::write(&token, fake_jwt("default", "httpbin")).unwrap();
    let out = dir.path().join("out").join("certs");
    let agent = Agent::start_at(
        &dir.path().join("sds").join("uds_path"),
        dir.path(),
        &[
            ("CA_PROVIDER", "LocalCA".into()),
            ("WORKLOAD_TOKEN_PATH", token.display().to_string()),
            ("OUTPUT_CERTS", out.display().to_string()),
            ("SECRET_TTL", "4s".into()),
            ("SECRET_GRACE_PERIOD_RATIO_JITTER", "0".into()),
        ],
    );
    let (chain_path, key_path, root_path) = (
        out.join("cert-chain.pem"),
        out.join("key.pem"),
        out.join("root-cert.pem"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root_path.exists() {
        assert!(Instant::now() < deadline, "no files; log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    // The files: the workload's chain, its key, and the root it chains to.
    assert_eq!(mode(&key_path), 0o600, "key.pem is private");
    assert_eq!(mode(&chain_path), 0o644);
    assert_eq!(mode(&root_path), 0o644);
    let chain = certs(&fs::read_to_string(&chain_path).unwrap()).unwrap();
    let root = certs(&fs::read_to_string(&root_path).unwrap()).unwrap();
    let leaf = X509Certificate::from_der(&chain[0]).unwrap().1;
    let root_cert = X509Certificate::from_der(&root[0]).unwrap().1;
    leaf.verify_signature(Some(root_cert.public_key()))
        .expect("the leaf chains to root-cert.pem");
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [SPIFFE_ID]);

    // A reader in a tight loop while the 4 s certificate rotates twice.
    // `..data` resolved once per read gives a pair from one write; the plain
    // names are read too, and every file read that way must be complete.
    let (mut reads, mut mismatched, mut torn, mut naive_mismatched) = (0u64, 0u64, 0u64, 0u64);
    let mut serials = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while serials.len() < 3 && Instant::now() < deadline {
        let set = out.join(fs::read_link(out.join("..data")).unwrap());
        let chain = fs::read_to_string(set.join("cert-chain.pem")).unwrap();
        let key = fs::read_to_string(set.join("key.pem")).unwrap();
        match pair(&chain, &key) {
            Some((serial, true)) => {
                serials.insert(serial);
            }
            Some((_, false)) => mismatched += 1,
            None => torn += 1,
        }
        let chain = fs::read_to_string(&chain_path).unwrap();
        let key = fs::read_to_string(&key_path).unwrap();
        let root = fs::read_to_string(&root_path).unwrap();
        match (pair(&chain, &key), certs(&root)) {
            (Some((_, matches)), Some(_)) => naive_mismatched += u64::from(!matches),
            _ => torn += 1,
        }
        reads += 1;
    }
    eprintln!(
        "{reads} reads, {} serials; reading the two plain names one after the other straddled a swap {naive_mismatched} times",
        serials.len()
    );
    assert!(
        serials.len() >= 3,
        "two rotations replaced the files: {serials:?}\n{}",
        agent.log()
    );
    assert!(reads > 100, "the reader ran ({reads} reads)");
    assert_eq!(mismatched, 0, "a key that does not match its certificate");
    assert_eq!(torn, 0, "an incomplete file");
    assert_eq!(mode(&key_path), 0o600, "the rewritten key is private too");

    // Each rewrite is logged; only the current and the previous set are kept.
    // (The log line follows the write the reader may already have seen.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.log().matches("wrote the certificate files").count() < serials.len() {
        assert!(
            Instant::now() < deadline,
            "each write is logged:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = agent.log();
    let sets = fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("..certs-")
        })
        .count();
    assert!(sets <= 2, "{sets} sets kept");
    let key = fs::read_to_string(&key_path).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!log.contains(&body[..40]), "key material in the log");
}

//! A fake Kubernetes control plane for tests: a service-account token issuer
//! (RS256 JWTs shaped like real projected and legacy tokens) and a TokenReview
//! endpoint that really verifies them, so Vault/OpenBao's `kubernetes` auth
//! method can be exercised without a cluster.
//!
//! Nothing here uses test-only macros, so the same code can back a standalone
//! example binary (see [`serve_forever`]).
//!
//! [`issuer`] signs the tokens, [`token_review`] serves the TokenReview API;
//! this file holds the names and RS256 pieces both use. Users name
//! everything as `k8s::Item`.

use std::time::{SystemTime, UNIX_EPOCH};

use rsa::pkcs1v15::Pkcs1v15Sign;
use sha2::{Digest, Sha256};

mod issuer;
mod token_review;

// Every test binary includes this module; not each uses every item.
#[allow(unused_imports)]
pub use issuer::{decode_claims_unverified, verify_rs256, TestIssuer};
#[allow(unused_imports)]
pub use token_review::{serve_forever, start_token_review, ReviewStats, TokenReviewHandle};

/// `iss` of projected tokens on a default kubeadm/kind cluster.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Default `aud` of projected tokens, and the API server's own audience.
pub const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// `iss` of legacy (Secret-based) service-account tokens.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";
/// Path of the TokenReview API.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// DER prefix of the PKCS#1 v1.5 `DigestInfo` for SHA-256. Spelled out so the
/// `rsa` crate does not need its `sha2` feature (only `pem` is required).
const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

fn rs256_scheme() -> Pkcs1v15Sign {
    Pkcs1v15Sign {
        hash_len: Some(32),
        prefix: SHA256_DIGEST_INFO.to_vec().into_boxed_slice(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs()
}

/// Deterministic UUID-shaped id, so the uid in a token and the uid the
/// TokenReview answers with always agree without shared state.
pub fn fake_uid(kind: &str, ns: &str, name: &str) -> String {
    let h = Sha256::digest(format!("{kind}/{ns}/{name}").as_bytes());
    let x: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Pod name used in minted tokens for a service account.
pub fn fake_pod_name(sa: &str) -> String {
    format!("{sa}-7d9f8b6c5-x2k4q")
}

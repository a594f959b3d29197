//! [`TestIssuer`]: an RSA key (generated, or loaded from a PEM file) that
//! signs service-account JWTs shaped like the kube-apiserver's: projected
//! tokens for given audiences, and legacy ones; and the reading and RS256
//! verification of such tokens.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{
    fake_pod_name, fake_uid, now_secs, rs256_scheme, DEFAULT_AUDIENCE, DEFAULT_ISSUER,
    LEGACY_ISSUER,
};

/// The service-account token signer (the API server's `--service-account-key-file`).
pub struct TestIssuer {
    key: RsaPrivateKey,
    public: RsaPublicKey,
    kid: String,
    /// `iss` claim of projected tokens.
    pub issuer: String,
    /// `aud` claim of projected tokens minted by [`TestIssuer::mint`].
    pub audiences: Vec<String>,
}

impl TestIssuer {
    /// Generates a fresh RSA-2048 key. Costs ~0.1–1 s with optimised
    /// dependencies and several seconds (up to ~30 s) in a plain debug
    /// build, so prefer [`TestIssuer::load_or_generate`] with a cached file
    /// or `[profile.dev.package."*"] opt-level = 2`.
    pub fn generate() -> anyhow::Result<Self> {
        let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048)?;
        Self::from_key(key)
    }

    /// Loads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        Self::from_key(RsaPrivateKey::from_pkcs8_pem(pem).context("parse issuer key")?)
    }

    /// Loads the key from `path`, or generates one and stores it there (mode
    /// 0600), so repeated test runs pay the key-generation cost once.
    pub fn load_or_generate(path: &Path) -> anyhow::Result<Self> {
        if let Ok(pem) = std::fs::read_to_string(path) {
            return Self::from_pem(&pem);
        }
        let issuer = Self::generate()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Each writer has its own temporary file; the first to link it into
        // place wins, and every other process and thread loads the winner's
        // key, so parallel test binaries agree on one issuer.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp.{}.{seq}", std::process::id()));
        std::fs::write(&tmp, issuer.private_key_pem()?.as_bytes())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Self::from_pem(&std::fs::read_to_string(path)?);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(issuer)
    }

    fn from_key(key: RsaPrivateKey) -> anyhow::Result<Self> {
        let public = RsaPublicKey::from(&key);
        let der = public.to_public_key_der()?;
        // Kubernetes derives `kid` from a hash of the public key, as here.
        let kid = B64URL.encode(Sha256::digest(der.as_bytes()));
        Ok(Self {
            key,
            public,
            kid,
            issuer: DEFAULT_ISSUER.to_string(),
            audiences: vec![DEFAULT_AUDIENCE.to_string()],
        })
    }

    /// The private key as PKCS#8 PEM, for caching. Never log it.
    pub fn private_key_pem(&self) -> anyhow::Result<String> {
        Ok(self.key.to_pkcs8_pem(LineEnding::LF)?.to_string())
    }

    /// SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), the form that
    /// Vault's `jwt_validation_pubkeys` and [`start_token_review`] accept.
    pub fn public_key_pem(&self) -> String {
        self.public
            .to_public_key_pem(LineEnding::LF)
            .expect("encode public key")
    }

    /// The `kid` header value of every token this issuer mints.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Mints a projected service-account token (the kubelet's
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token` since 1.21) for
    /// `ns`/`sa`, valid from now for `ttl`, with this issuer's audiences.
    pub fn mint(&self, ns: &str, sa: &str, ttl: Duration) -> String {
        let auds: Vec<&str> = self.audiences.iter().map(String::as_str).collect();
        self.mint_for_audiences(ns, sa, ttl, &auds)
    }

    /// Like [`TestIssuer::mint`] with explicit `aud` values.
    pub fn mint_for_audiences(&self, ns: &str, sa: &str, ttl: Duration, aud: &[&str]) -> String {
        let now = now_secs();
        let pod = fake_pod_name(sa);
        let claims = json!({
            "aud": aud,
            "exp": now + ttl.as_secs(),
            "iat": now,
            "iss": self.issuer,
            "jti": fake_uid("jti", &format!("{now}-{}", rand::random::<u64>()), sa),
            "kubernetes.io": {
                "namespace": ns,
                "node": { "name": "node-1", "uid": fake_uid("node", "", "node-1") },
                "pod": { "name": pod, "uid": fake_uid("pod", ns, &pod) },
                "serviceaccount": { "name": sa, "uid": fake_uid("sa", ns, sa) },
            },
            "nbf": now,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        });
        self.sign(&claims)
    }

    /// Mints a legacy Secret-based token (pre-1.24 shape): no `exp`, `aud`
    /// or `nbf`, and flat `kubernetes.io/serviceaccount/*` claims.
    pub fn mint_legacy(&self, ns: &str, sa: &str) -> String {
        let claims = json!({
            "iss": LEGACY_ISSUER,
            "kubernetes.io/serviceaccount/namespace": ns,
            "kubernetes.io/serviceaccount/secret.name": format!("{sa}-token-abcde"),
            "kubernetes.io/serviceaccount/service-account.name": sa,
            "kubernetes.io/serviceaccount/service-account.uid": fake_uid("sa", ns, sa),
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        });
        self.sign(&claims)
    }

    /// Signs arbitrary claims with RS256, for tests that need odd tokens.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({ "alg": "RS256", "kid": self.kid, "typ": "JWT" });
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let digest = Sha256::digest(signing_input.as_bytes());
        let sig = self
            .key
            .sign(rs256_scheme(), &digest)
            .expect("RSA signing cannot fail for a valid key");
        format!("{signing_input}.{}", B64URL.encode(sig))
    }
}

/// Decodes a JWT's claims WITHOUT verifying it (for assertions in tests).
pub fn decode_claims_unverified(token: &str) -> anyhow::Result<Value> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow!("not a JWT"))?;
    Ok(serde_json::from_slice(&B64URL.decode(payload)?)?)
}

/// Verifies an RS256 JWT's signature and its `exp`/`nbf` (60 s leeway, like
/// the API server) and returns its claims.
pub fn verify_rs256(token: &str, key: &RsaPublicKey) -> anyhow::Result<Value> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed JWT");
    };
    let header: Value = serde_json::from_slice(&B64URL.decode(h).context("bad header")?)?;
    if header["alg"] != "RS256" {
        bail!("unexpected signing algorithm");
    }
    let sig = B64URL.decode(s).context("bad signature encoding")?;
    let digest = Sha256::digest(format!("{h}.{p}").as_bytes());
    key.verify(rs256_scheme(), &digest, &sig)
        .map_err(|_| anyhow!("invalid signature"))?;
    let claims: Value = serde_json::from_slice(&B64URL.decode(p).context("bad payload")?)?;
    let now = now_secs();
    const LEEWAY: u64 = 60;
    if let Some(exp) = claims["exp"].as_u64() {
        if now > exp + LEEWAY {
            bail!("token has expired");
        }
    }
    if let Some(nbf) = claims["nbf"].as_u64() {
        if now + LEEWAY < nbf {
            bail!("token used before issued");
        }
    }
    Ok(claims)
}

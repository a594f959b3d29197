//! Test helpers for the secret manager and the trust bundle: JWTs, and a CA
//! whose certificates follow the paused tokio clock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::WorkloadSecret;
use crate::ca::{Authorization, CaClient, CaError, CaFailure};
use crate::clock::Clock;
use crate::crypto::{verify_issued, IssuedChain, KeyType, PrivateKey};
use crate::identity::{Credential, SpiffeId};
use crate::trust::RootsInUse;

/// A service-account JWT for `ns/sa` (unsigned: the fake CA does not check
/// signatures), expiring at `exp` (Unix seconds) when given.
pub fn jwt(sa: &str, exp: Option<i64>) -> Credential {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let exp = exp.map(|e| format!(r#","exp":{e}"#)).unwrap_or_default();
    // A nonce, so that two JWTs of one account with one expiry differ.
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    Credential::new(format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"none"}"#),
        b64(&format!(
            r#"{{"sub":"system:serviceaccount:ns:{sa}","jti":"{n}"{exp}}}"#
        ))
    ))
}

/// A secret for `identity` from a throw-away CA, holding no trust bundle.
pub async fn secret_for(identity: &SpiffeId) -> Arc<WorkloadSecret> {
    let ca = FakeCa::new(Clock::system());
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let chain = ca
        .sign(
            &Authorization::default(),
            &key.csr_pem(identity).unwrap(),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    let leaf = verify_issued(&chain, &key.public_key_der(), identity, SystemTime::now()).unwrap();
    Arc::new(WorkloadSecret {
        identity: identity.clone(),
        key,
        chain_pem: chain.chain_pem.concat(),
        leaf,
        received: SystemTime::now(),
        roots: RootsInUse::detached(),
        memo: Default::default(),
    })
}

/// A self-signed root whose validity follows a [`Clock`].
pub struct TestRoot {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestRoot {
    pub fn new(clock: &Clock, name: &str, lifetime: Duration) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = clock.now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// What the fake CA was asked, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A login with the JWT of this fingerprint (answered or not).
    Login(String),
    /// A sign with this token.
    Sign(u64),
    Invalidate(u64),
    Release(String),
    ListRoots,
}

/// A CA for tests: logins cached per JWT, tokens that can be revoked, roots
/// that can rotate, answers that can fail, latencies in tokio time, and a
/// record of every call with its (tokio) time.
pub struct FakeCa {
    clock: Clock,
    pub roots: Mutex<Vec<Arc<TestRoot>>>,
    /// Index of the root that signs.
    pub signing: Mutex<usize>,
    /// What `trust_roots` answers: indexes of listed roots, or an error.
    pub listing: Mutex<Result<Vec<usize>, CaError>>,
    /// Signs fail with this while set.
    pub sign_error: Mutex<Option<CaError>>,
    /// The next sign only is refused with this.
    pub next_sign_error: Mutex<Option<CaError>>,
    pub login_latency: Mutex<Duration>,
    pub sign_latency: Mutex<Duration>,
    pub list_latency: Mutex<Duration>,
    /// Calls in progress now, and the most ever at once.
    in_flight: Arc<(AtomicU64, AtomicU64)>,
    /// Fingerprints of JWTs whose logins are rejected.
    pub rejected: Mutex<HashSet<String>>,
    /// Cached token per JWT fingerprint.
    tokens: Mutex<HashMap<String, u64>>,
    /// Tokens whose signs are rejected (revoked at the CA).
    revoked: Mutex<HashSet<u64>>,
    next_token: AtomicU64,
    calls: Mutex<Vec<(Instant, Call)>>,
}

impl FakeCa {
    /// One root (10 years), listed and signing.
    pub fn new(clock: Clock) -> Arc<Self> {
        let root = Arc::new(TestRoot::new(
            &clock,
            "fake root 0",
            Duration::from_secs(10 * 365 * 86400),
        ));
        Arc::new(Self {
            clock,
            roots: Mutex::new(vec![root]),
            signing: Mutex::new(0),
            listing: Mutex::new(Ok(vec![0])),
            sign_error: Mutex::new(None),
            next_sign_error: Mutex::new(None),
            login_latency: Mutex::new(Duration::ZERO),
            sign_latency: Mutex::new(Duration::ZERO),
            list_latency: Mutex::new(Duration::ZERO),
            in_flight: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
            rejected: Mutex::new(HashSet::new()),
            tokens: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashSet::new()),
            next_token: AtomicU64::new(1),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// Adds a root living `lifetime`; returns its index.
    pub fn add_root(&self, lifetime: Duration) -> usize {
        let mut roots = self.roots.lock().unwrap();
        let name = format!("fake root {}", roots.len());
        roots.push(Arc::new(TestRoot::new(&self.clock, &name, lifetime)));
        roots.len() - 1
    }

    pub fn root_pem(&self, i: usize) -> String {
        crate::crypto::split_pem_certs(&self.roots.lock().unwrap()[i].pem)
            .unwrap()
            .remove(0)
    }

    pub fn set_listing(&self, listing: Result<Vec<usize>, CaError>) {
        *self.listing.lock().unwrap() = listing;
    }

    /// Forgets every cached login (as when tokens expire).
    pub fn drop_tokens(&self) {
        self.tokens.lock().unwrap().clear();
    }

    /// Revokes every token issued so far: signs with them are rejected.
    pub fn revoke_tokens(&self) {
        let n = self.next_token.load(Ordering::SeqCst);
        self.revoked.lock().unwrap().extend(1..n);
    }

    pub fn reject(&self, jwt: &Credential) {
        self.rejected.lock().unwrap().insert(jwt.fingerprint());
    }

    pub fn calls(&self) -> Vec<(Instant, Call)> {
        self.calls.lock().unwrap().clone()
    }

    pub fn count(&self, f: impl Fn(&Call) -> bool) -> usize {
        self.calls().iter().filter(|(_, c)| f(c)).count()
    }

    pub fn signs(&self) -> usize {
        self.count(|c| matches!(c, Call::Sign(_)))
    }

    /// Calls (logins, signs, listings) in progress now: one stays counted
    /// until the future making it ends or is dropped.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.0.load(Ordering::SeqCst)
    }

    /// The most calls (logins, signs, listings) that were ever in progress at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.in_flight.1.load(Ordering::SeqCst)
    }

    /// Records `call` and counts it in progress until the guard drops.
    fn record(&self, call: Call) -> InFlight {
        self.calls.lock().unwrap().push((Instant::now(), call));
        let now = self.in_flight.0.fetch_add(1, Ordering::SeqCst) + 1;
        self.in_flight.1.fetch_max(now, Ordering::SeqCst);
        InFlight(self.in_flight.clone())
    }

    fn auth(token: u64) -> Authorization {
        Authorization {
            token: Some(Arc::new(Zeroizing::new(token.to_string()))),
            ..Authorization::default()
        }
    }

    fn token_of(auth: &Authorization) -> u64 {
        auth.token
            .as_ref()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    }

    fn sign_csr(&self, root: &TestRoot, csr: &str, ttl: Duration) -> String {
        let mut csr = CertificateSigningRequestParams::from_pem(csr).unwrap();
        let now = self.clock.now();
        let p = &mut csr.params;
        // Back-dated as Vault does.
        p.not_before = (now - Duration::from_secs(30)).into();
        p.not_after = (now + ttl).into();
        p.is_ca = IsCa::ExplicitNoCa;
        p.serial_number = Some(serial());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.signed_by(&root.issuer).unwrap().pem()
    }
}

#[async_trait]
impl CaClient for FakeCa {
    fn describe(&self) -> String {
        "fake CA".into()
    }

    async fn login(&self, credential: &Credential) -> Result<Authorization, CaError> {
        let fp = credential.fingerprint();
        let _busy = self.record(Call::Login(fp.clone()));
        let latency = *self.login_latency.lock().unwrap();
        tokio::time::sleep(latency).await;
        if self.rejected.lock().unwrap().contains(&fp) {
            return Err(CaError::rejected("permission denied"));
        }
        let token = self.next_token.fetch_add(1, Ordering::SeqCst);
        self.tokens.lock().unwrap().insert(fp, token);
        Ok(Self::auth(token))
    }

    async fn login_anew(&self, credential: &Credential) -> Result<Authorization, CaError> {
        self.tokens
            .lock()
            .unwrap()
            .remove(&credential.fingerprint());
        self.login(credential).await
    }

    async fn cached_login(&self, credential: &Credential) -> Option<Authorization> {
        let token = *self.tokens.lock().unwrap().get(&credential.fingerprint())?;
        Some(Self::auth(token))
    }

    async fn sign(
        &self,
        auth: &Authorization,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        let token = Self::token_of(auth);
        let _busy = self.record(Call::Sign(token));
        let latency = *self.sign_latency.lock().unwrap();
        tokio::time::sleep(latency).await;
        if let Some(e) = self.next_sign_error.lock().unwrap().take() {
            return Err(e);
        }
        if let Some(e) = self.sign_error.lock().unwrap().clone() {
            return Err(e);
        }
        if self.revoked.lock().unwrap().contains(&token) {
            return Err(CaError::Rejected(
                CaFailure::new("permission denied (token revoked)").token_refused(),
            ));
        }
        let root = self.roots.lock().unwrap()[*self.signing.lock().unwrap()].clone();
        Ok(IssuedChain {
            chain_pem: vec![self.sign_csr(&root, csr_pem, ttl)],
            roots_pem: vec![root.pem.clone()],
        })
    }

    async fn trust_roots(&self) -> Result<Vec<String>, CaError> {
        let _busy = self.record(Call::ListRoots);
        let latency = *self.list_latency.lock().unwrap();
        tokio::time::sleep(latency).await;
        let listing = self.listing.lock().unwrap().clone()?;
        let roots = self.roots.lock().unwrap();
        Ok(listing.iter().map(|i| roots[*i].pem.clone()).collect())
    }

    fn invalidate(&self, auth: &Authorization) {
        let token = Self::token_of(auth);
        drop(self.record(Call::Invalidate(token)));
        self.tokens.lock().unwrap().retain(|_, t| *t != token);
    }

    async fn release(&self, credential: &Credential) {
        let fp = credential.fingerprint();
        drop(self.record(Call::Release(fp.clone())));
        self.tokens.lock().unwrap().remove(&fp);
    }

    async fn shutdown(&self) {
        self.tokens.lock().unwrap().clear();
    }
}

/// One call in progress at the fake CA.
struct InFlight(Arc<(AtomicU64, AtomicU64)>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A secret manager on `ca` with `opts`, sharing one CA queue with its trust
/// bundle as the agent's do (the trust bundle reads `opts.clock`).
pub fn manager(ca: Arc<FakeCa>, opts: super::ManagerOptions) -> Arc<super::SecretManager> {
    manager_and_trust(ca, opts).0
}

/// [`manager`], and its trust bundle (to publish federated roots in).
pub fn manager_and_trust(
    ca: Arc<FakeCa>,
    mut opts: super::ManagerOptions,
) -> (Arc<super::SecretManager>, Arc<crate::trust::TrustBundle>) {
    let queue = crate::ca::queue::CaQueue::new(opts.max_concurrency);
    opts.queue = Some(queue.clone());
    let trust = crate::trust::TrustBundle::start(
        ca.clone(),
        crate::trust::TrustOptions {
            clock: opts.clock,
            queue: Some(queue),
            ..crate::trust::TrustOptions::default()
        },
    )
    .expect("the fake CA's roots start a trust bundle");
    (super::SecretManager::new(ca, trust.clone(), opts), trust)
}

//! `CA_PROVIDER=LocalCA`: an in-process CA for development and tests.
//!
//! It signs whatever SPIFFE ID a connection's JWT claims, without verifying the
//! JWT: anyone who can reach the socket gets any identity. Never use it where
//! workloads must be told apart by a real authority.
//!
//! With `LOCAL_CA_DIR` its root persists there (`ca-key.pem`, mode 0600, and
//! `ca-cert.pem`). A root is rotated with [`LocalCa::rotate_dir`] (or by hand:
//! `mv ca-cert.pem previous-ca-cert.pem && rm ca-key.pem`) while the agent is
//! stopped: the next start makes a new root, and the previous one stays in
//! the trust roots until it expires, so that certificates issued before the
//! rotation keep verifying.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use super::{Authorization, CaClient, CaError};
use crate::clock::Clock;
use crate::crypto::{IssuedChain, KeyType, PrivateKey};
use crate::identity::Credential;
use crate::metrics::{self, CaKind};

const KEY_FILE: &str = "ca-key.pem";
const CERT_FILE: &str = "ca-cert.pem";
/// The root before the last rotation, trusted until it expires.
const PREVIOUS_CERT_FILE: &str = "previous-ca-cert.pem";
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Errors setting up the local CA.
#[derive(Debug, thiserror::Error)]
pub enum LocalCaError {
    #[error("LOCAL_CA_DIR {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("LOCAL_CA_DIR {dir}: {what}")]
    Invalid { dir: PathBuf, what: String },
    #[error("cannot create the local CA root: {0}")]
    Create(String),
}

/// The in-process CA.
pub struct LocalCa {
    issuer: Issuer<'static, rcgen::KeyPair>,
    root_pem: String,
    /// The root before the last rotation (`previous-ca-cert.pem`).
    previous_root_pem: Option<String>,
    /// When certificates are signed, and which roots are still valid.
    clock: Clock,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalCa")
    }
}

impl LocalCa {
    /// Makes a fresh root, or loads it from `dir` (creating and persisting it
    /// there on first start, key file mode 0600).
    pub fn new(dir: Option<&Path>, trust_domain: &str) -> Result<Self, LocalCaError> {
        match dir {
            None => Self::generate(trust_domain),
            Some(dir) => {
                let mut ca = Self::load_or_create(dir, trust_domain)?;
                ca.previous_root_pem = Self::load_previous(dir)?;
                Ok(ca)
            }
        }
    }

    /// The same CA, reading time from `clock` instead of the system clock:
    /// its certificates' validity starts at the clock's now, and the
    /// previous root is trusted until it expires by it.
    pub fn with_clock(self, clock: Clock) -> Self {
        Self { clock, ..self }
    }

    /// Rotates the root kept in `dir` (the agent must be stopped): the
    /// current root becomes the previous one and its key is removed, so that
    /// the next start makes a new root. Refused when `dir` holds no root.
    pub fn rotate_dir(dir: &Path) -> Result<(), LocalCaError> {
        let io = |what: &str, source| LocalCaError::Io {
            dir: dir.to_path_buf(),
            what: what.to_string(),
            source,
        };
        if !dir.join(CERT_FILE).exists() || !dir.join(KEY_FILE).exists() {
            return Err(LocalCaError::Invalid {
                dir: dir.to_path_buf(),
                what: format!("holds no root to rotate ({CERT_FILE} and {KEY_FILE})"),
            });
        }
        fs::rename(dir.join(CERT_FILE), dir.join(PREVIOUS_CERT_FILE))
            .map_err(|e| io("cannot keep the current root as the previous one", e))?;
        fs::remove_file(dir.join(KEY_FILE)).map_err(|e| io("cannot remove the old key", e))
    }

    /// `previous-ca-cert.pem`, when present: a self-signed certificate.
    fn load_previous(dir: &Path) -> Result<Option<String>, LocalCaError> {
        let path = dir.join(PREVIOUS_CERT_FILE);
        let pem = match fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(LocalCaError::Io {
                    dir: dir.to_path_buf(),
                    what: format!("cannot read {}", path.display()),
                    source: e,
                })
            }
        };
        if !crate::crypto::is_self_signed(&pem) {
            return Err(LocalCaError::Invalid {
                dir: dir.to_path_buf(),
                what: format!(
                    "{} is not a self-signed root certificate; remove it or restore the previous root",
                    path.display()
                ),
            });
        }
        Ok(Some(pem))
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn generate(trust_domain: &str) -> Result<Self, LocalCaError> {
        Ok(Self::generate_with_key(trust_domain)?.0)
    }

    fn generate_with_key(trust_domain: &str) -> Result<(Self, PrivateKey), LocalCaError> {
        let create = |e: &dyn std::fmt::Display| LocalCaError::Create(e.to_string());
        let key = PrivateKey::generate(KeyType::EcP256).map_err(|e| create(&e))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| create(&e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "node-agent local CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A root signs certificates and CRLs, nothing else.
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(key.key_pair()).map_err(|e| create(&e))?;
        let ca = Self {
            root_pem: cert.pem(),
            issuer: Issuer::new(params, owned_key_pair(&key).map_err(|e| create(&e))?),
            previous_root_pem: None,
            clock: Clock::system(),
        };
        Ok((ca, key))
    }

    fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, LocalCaError> {
        let io = |what: &str, source| LocalCaError::Io {
            dir: dir.to_path_buf(),
            what: what.to_string(),
            source,
        };
        let invalid = |what: String| LocalCaError::Invalid {
            dir: dir.to_path_buf(),
            what,
        };
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => {
                let meta = fs::metadata(&key_path).map_err(|e| io("cannot read key file", e))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(invalid(format!(
                        "{} is readable by group or others (mode {:o}); run chmod 600 on it",
                        key_path.display(),
                        meta.permissions().mode() & 0o777
                    )));
                }
                let key_pem = zeroize::Zeroizing::new(
                    fs::read_to_string(&key_path).map_err(|e| io("cannot read key file", e))?,
                );
                let cert_pem = fs::read_to_string(&cert_path).map_err(|e| io("cannot read certificate file", e))?;
                let key = PrivateKey::from_pem(&key_pem)
                    .map_err(|_| invalid(format!("{} is not a PKCS#8 PEM private key", key_path.display())))?;
                let signing_key = owned_key_pair(&key).map_err(|e| invalid(e.to_string()))?;
                let issuer = Issuer::from_ca_cert_pem(&cert_pem, signing_key)
                    .map_err(|e| invalid(format!("{} is not a CA certificate: {e}", cert_path.display())))?;
                // The key must be the certificate's.
                let der = x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes())
                    .next()
                    .and_then(|p| p.ok())
                    .ok_or_else(|| invalid(format!("{} holds no PEM certificate", cert_path.display())))?;
                let cert = der
                    .parse_x509()
                    .map_err(|e| invalid(format!("{} is not a certificate: {e}", cert_path.display())))?;
                if cert.public_key().raw != key.public_key_der().as_slice() {
                    return Err(invalid(format!(
                        "{} does not belong to the certificate in {}",
                        key_path.display(),
                        cert_path.display()
                    )));
                }
                drop(cert);
                Ok(Self {
                    issuer,
                    root_pem: cert_pem,
                    previous_root_pem: None,
                    clock: Clock::system(),
                })
            }
            (false, false) => {
                fs::create_dir_all(dir).map_err(|e| io("cannot create directory", e))?;
                let (ca, key) = Self::generate_with_key(trust_domain)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(|e| io("cannot create key file", e))?;
                f.write_all(key.pkcs8_pem().as_bytes())
                    .map_err(|e| io("cannot write key file", e))?;
                fs::write(&cert_path, &ca.root_pem).map_err(|e| io("cannot write certificate file", e))?;
                fs::set_permissions(&cert_path, fs::Permissions::from_mode(0o644))
                    .map_err(|e| io("cannot set certificate file mode", e))?;
                Ok(ca)
            }
            _ => Err(invalid(format!(
                "has only one of {KEY_FILE} and {CERT_FILE}; restore the other or remove both to make a new root"
            ))),
        }
    }

    /// Signs a CSR for `ttl`: the leaf keeps the CSR's public key and SANs.
    pub fn sign_csr(&self, csr_pem: &str, ttl: Duration) -> Result<String, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::rejected(format!("local CA: invalid CSR: {e}")))?;
        let now = OffsetDateTime::from(self.clock.now());
        let p = &mut csr.params;
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + ttl;
        p.is_ca = IsCa::ExplicitNoCa;
        p.serial_number = Some(random_serial());
        // digitalSignature alone, whatever the key: an EC key must not carry
        // keyEncipherment (RFC 8813), and an RSA key needs it only for TLS
        // 1.2's static RSA key exchange, which Envoy's default cipher lists
        // (ECDHE only, client and server) leave out.
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| CaError::bad_answer(format!("local CA: signing failed: {e}")))?;
        Ok(cert.pem())
    }
}

/// rcgen's issuer owns its key; the agent's copy stays in the `PrivateKey`.
fn owned_key_pair(key: &PrivateKey) -> Result<rcgen::KeyPair, rcgen::Error> {
    rcgen::KeyPair::from_pem(key.pkcs8_pem())
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never shortened
    SerialNumber::from_slice(&bytes)
}

#[async_trait]
impl CaClient for LocalCa {
    fn describe(&self) -> String {
        "local CA".into()
    }

    async fn login(&self, _credential: &Credential) -> Result<Authorization, CaError> {
        Ok(Authorization::default())
    }

    async fn login_anew(&self, _credential: &Credential) -> Result<Authorization, CaError> {
        Ok(Authorization::default())
    }

    async fn cached_login(&self, _credential: &Credential) -> Option<Authorization> {
        Some(Authorization::default())
    }

    async fn sign(
        &self,
        _auth: &Authorization,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        metrics::ca_request(CaKind::Sign, async {
            Ok(IssuedChain {
                chain_pem: vec![self.sign_csr(csr_pem, ttl)?],
                roots_pem: vec![self.root_pem.clone()],
            })
        })
        .await
    }

    /// The root, and the previous one while it is still valid.
    async fn trust_roots(&self) -> Result<Vec<String>, CaError> {
        let now = self.clock.now();
        let previous = self
            .previous_root_pem
            .iter()
            .filter(|pem| crate::crypto::cert_not_after(pem).is_some_and(|t| t > now))
            .cloned();
        let roots = std::iter::once(self.root_pem.clone()).chain(previous);
        metrics::ca_request(CaKind::Roots, async { Ok(roots.collect()) }).await
    }

    /// Nothing to forget: the local CA accepts every credential.
    fn invalidate(&self, _auth: &Authorization) {}

    /// Nothing to revoke.
    async fn release(&self, _credential: &Credential) {}

    /// Nothing to revoke.
    async fn shutdown(&self) {}
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;

//! The endpoint's TLS certificate and key (`BUNDLE_ENDPOINT_CERT`,
//! `BUNDLE_ENDPOINT_KEY`): read at start (unusable: the endpoint does not
//! start), then checked every [`CHECK_EVERY`] and re-read when either file's
//! content changes, so that a certificate renewed on disk (cert-manager
//! updating the Secret) is served without a restart. A pair that cannot be
//! used (half written, key not the certificate's) is logged once and the
//! previous one kept. Nothing of the key reaches a log line.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// How often the files are checked for a change.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Largest certificate or key file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why the certificate and key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read BUNDLE_ENDPOINT_{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BUNDLE_ENDPOINT_{what} {path} is larger than 1 MiB")]
    TooLarge { what: &'static str, path: PathBuf },
    #[error("BUNDLE_ENDPOINT_CERT {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("BUNDLE_ENDPOINT_KEY {path} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("BUNDLE_ENDPOINT_KEY {key} does not go with the certificate of BUNDLE_ENDPOINT_CERT {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The two files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The certificate served, swapped when the files change.
pub struct ReloadingCert {
    files: CertFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Digest of the files' content last read, usable or not.
    seen: RwLock<[u8; 32]>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl ReloadingCert {
    /// Reads the pair; fails when it cannot be served.
    pub fn load(files: CertFiles, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let (cert, key) = read_files(&files)?;
        let seen = digest(&cert, &key);
        let certified = certified_key(&files, &cert, &key, &provider)?;
        log_certificate("serving the TLS certificate", &files.cert, &certified);
        Ok(Self {
            files,
            provider,
            current: RwLock::new(Arc::new(certified)),
            seen: RwLock::new(seen),
        })
    }

    /// Re-reads the pair if either file changed; keeps the current one if
    /// the new one cannot be used.
    pub fn check(&self) {
        let (cert, key) = match read_files(&self.files) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("bundle endpoint: {e}; keeping the TLS certificate served");
                return;
            }
        };
        let d = digest(&cert, &key);
        if *self.seen.read().unwrap_or_else(|e| e.into_inner()) == d {
            return;
        }
        *self.seen.write().unwrap_or_else(|e| e.into_inner()) = d;
        match certified_key(&self.files, &cert, &key, &self.provider) {
            Ok(certified) => {
                log_certificate(
                    "the TLS certificate changed on disk; now serving",
                    &self.files.cert,
                    &certified,
                );
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
            }
            Err(e) => tracing::warn!(
                "bundle endpoint: {e}; keeping the TLS certificate served until the files change again"
            ),
        }
    }

    /// Checks the files every [`CHECK_EVERY`], forever.
    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let me = self.clone();
            // File reads block; keep them off the runtime's thread.
            let _ = tokio::task::spawn_blocking(move || me.check()).await;
        }
    }
}

fn read_files(files: &CertFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    Ok((
        read_file("CERT", &files.cert)?,
        read_file("KEY", &files.key)?,
    ))
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TlsError::TooLarge {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_be_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

fn certified_key(
    files: &CertFiles,
    cert: &[u8],
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate(files.cert.clone()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(files.cert.clone()));
    }
    // The PEM errors name sections and positions, never the key's bytes.
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::BadKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })
}

fn log_certificate(what: &str, path: &Path, key: &CertifiedKey) {
    let Some(leaf) = key.cert.first() else { return };
    let pem = crate::crypto::der_to_pem(leaf);
    if let Some((subject, serial, not_after)) = crate::crypto::cert_summary(&pem) {
        tracing::info!(
            file = %path.display(),
            subject = %subject,
            serial = %serial,
            expires = %crate::clock::rfc3339(not_after),
            "bundle endpoint: {what}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn served_der(r: &ReloadingCert) -> Vec<u8> {
        r.current.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn a_new_pair_on_disk_is_served_and_a_bad_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let files = CertFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (c1, k1) = pair("one.example");
        std::fs::write(&files.cert, &c1).unwrap();
        std::fs::write(&files.key, &k1).unwrap();
        let r = ReloadingCert::load(files.clone(), provider.clone()).unwrap();
        let first = served_der(&r);

        // A certificate without its key: refused, the old pair stays.
        let (c2, k2) = pair("two.example");
        std::fs::write(&files.cert, &c2).unwrap();
        r.check();
        assert_eq!(served_der(&r), first);
        std::fs::write(&files.key, &k2).unwrap();
        r.check();
        assert_ne!(served_der(&r), first);

        std::fs::write(&files.key, "junk").unwrap();
        let e = ReloadingCert::load(files.clone(), provider.clone()).unwrap_err();
        assert!(matches!(e, TlsError::BadKey { .. }), "{e}");
        std::fs::write(&files.key, &k1).unwrap();
        let e = ReloadingCert::load(files, provider).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        assert!(!e.to_string().contains("PRIVATE KEY"), "{e}");
    }
}

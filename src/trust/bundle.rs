//! What `ROOTCA` serves: a set of root certificates, and the facts about
//! each root that the trust bundle decides and logs by; beside them, the
//! roots of every federated trust domain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use super::spiffe_bundle::TrustDomain;
use crate::crypto::{der_to_pem, CryptoError};
use crate::memo::Memo;
use crate::sds::encoded::Encoded;

/// The roots of each federated (foreign) trust domain, PEM, one block
/// each: the last good bundle read from each domain's source.
pub type Federated = BTreeMap<TrustDomain, Vec<String>>;

/// The roots served as `ROOTCA`, PEM, in a stable order (latest expiry first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootBundle {
    pub pems: Vec<String>,
    /// Counts the bundle's changes; a later bundle has a higher number. Lets a
    /// consumer that receives bundles by two paths keep the newest.
    pub generation: u64,
    /// Federated trust domains' roots. Not part of `ROOTCA`, nor of
    /// [`RootBundle::version`]; served by the resources that name each
    /// trust domain (`ALL`, the Workload API's federated bundles).
    pub federated: Arc<Federated>,
    /// What is derived from the bundle, made at its first use: a bundle is
    /// not changed once made (each change of the roots makes a new one).
    pub memo: BundleMemo,
}

/// What is derived from a [`RootBundle`]: its versions, and its resources
/// as SDS encodes them (`ALL`'s for the trust domain it was first made for).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleMemo {
    version: Memo<String>,
    all_version: Memo<String>,
    pub(crate) rootca: Memo<Arc<Encoded>>,
    pub(crate) all: Memo<(String, Arc<Encoded>)>,
}

impl RootBundle {
    /// The bundle as served in `trusted_ca`.
    pub fn pem(&self) -> String {
        self.pems.concat()
    }

    /// Changes exactly when the bundle's content does.
    pub fn version(&self) -> String {
        self.memo
            .version
            .get_or_init(|| {
                let d = Sha256::digest(self.pem().as_bytes());
                d[..8].iter().map(|b| format!("{b:02x}")).collect()
            })
            .clone()
    }

    /// Changes exactly when this mesh's roots or any federated domain's do.
    pub fn all_version(&self) -> String {
        self.memo
            .all_version
            .get_or_init(|| self.digest_all())
            .clone()
    }

    fn digest_all(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.pem().as_bytes());
        for (td, pems) in self.federated.iter() {
            h.update([0u8]);
            h.update(td.as_str().as_bytes());
            h.update([0u8]);
            for p in pems {
                h.update(p.as_bytes());
            }
        }
        let d = h.finalize();
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One root certificate, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootCert {
    /// Normalised PEM (one certificate).
    pub pem: String,
    /// SHA-256 of the DER: the root's identity.
    pub id: [u8; 32],
    pub subject: String,
    /// Hex, colon-separated, as `openssl x509 -serial` shows it.
    pub serial: String,
    pub not_after: SystemTime,
}

impl RootCert {
    /// Parses every certificate in `pem` (one or more PEM blocks).
    pub fn parse_all(pem: &str) -> Result<Vec<RootCert>, CryptoError> {
        let bad = |m: String| CryptoError::BadCertificate(m);
        let mut out = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
            let block = block.map_err(|e| bad(format!("malformed PEM: {e}")))?;
            if block.label != "CERTIFICATE" {
                return Err(bad(format!(
                    "expected a CERTIFICATE PEM block, found {:?}",
                    block.label
                )));
            }
            let (_, cert) = X509Certificate::from_der(&block.contents)
                .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
            let secs = cert.validity().not_after.timestamp().max(0) as u64;
            out.push(RootCert {
                pem: der_to_pem(&block.contents),
                id: Sha256::digest(&block.contents).into(),
                subject: cert.subject().to_string(),
                serial: cert.raw_serial_as_string(),
                not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_facts_and_refuses_what_is_not_a_certificate() {
        let ca = crate::ca::local::LocalCa::new(None, "td").unwrap();
        let two = format!("{}\n{}", ca.root_pem(), ca.root_pem());
        let roots = RootCert::parse_all(&two).unwrap();
        assert_eq!(roots.len(), 2);
        assert_eq!(roots[0], roots[1]);
        assert!(
            roots[0].subject.contains("node-agent local CA"),
            "{roots:?}"
        );
        assert!(roots[0].not_after > SystemTime::now() + Duration::from_secs(86400 * 365));
        assert!(!roots[0].serial.is_empty());
        assert!(RootCert::parse_all(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        .is_err());

        let b = RootBundle {
            pems: vec![roots[0].pem.clone()],
            generation: 1,
            ..Default::default()
        };
        let other = RootBundle {
            pems: vec![],
            generation: 2,
            ..Default::default()
        };
        assert_ne!(b.version(), other.version());
        assert_eq!(b.pem(), roots[0].pem);

        // Federated roots change the version of everything, not ROOTCA's.
        let td = TrustDomain::parse("other.example").unwrap();
        let with = RootBundle {
            federated: Arc::new(Federated::from([(td.clone(), vec![roots[0].pem.clone()])])),
            ..b.clone()
        };
        assert_eq!(with.version(), b.version());
        assert_ne!(with.all_version(), b.all_version());
        let moved = RootBundle {
            federated: Arc::new(Federated::from([(
                TrustDomain::parse("third.example").unwrap(),
                vec![roots[0].pem.clone()],
            )])),
            ..b.clone()
        };
        assert_ne!(moved.all_version(), with.all_version());
    }
}

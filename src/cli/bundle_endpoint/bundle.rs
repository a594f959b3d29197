//! The bundle served: the PKI mount's roots as a SPIFFE bundle, replaced
//! when a read of the mount finds another set, kept when a read fails or
//! finds none (an empty bundle is never served).
//!
//! **`spiffe_sequence`.** Replicas of the endpoint should serve the same
//! sequence for the same roots, whenever each started. The sequence is
//! therefore derived from the roots: the NotBefore of the newest root plus
//! the NotBefore of the oldest one, in Unix seconds. A root rotation done
//! the documented way raises it at each step: a new root (a later NotBefore)
//! raises the first term, removing the old root (the earliest NotBefore)
//! raises the second, and so does an old root expiring. Any other change
//! (re-importing an older root, deleting the newest) would not raise it, so
//! the sequence served after a change is never less than the one before
//! plus one: it always increases within a process, and replicas then agree
//! again from the next change that raises the derived value.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::body::Bytes;
use x509_parser::prelude::*;

use crate::clock::rfc3339;
use crate::trust::spiffe_bundle::{self, BundleError};

/// One root served, with what the logs say of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    pub der: Vec<u8>,
    pub subject: String,
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: SystemTime,
}

impl Root {
    fn from_pem(pem: &str) -> Result<Root, String> {
        let der = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .next()
            .ok_or("no PEM certificate")?
            .map_err(|e| format!("malformed PEM: {e}"))?
            .contents;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let validity = cert.validity();
        let not_after =
            UNIX_EPOCH + Duration::from_secs(validity.not_after.timestamp().max(0).unsigned_abs());
        Ok(Root {
            subject: cert.subject().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: validity.not_before.timestamp(),
            not_after,
            der,
        })
    }

    fn log(&self, change: &str) {
        tracing::info!(
            subject = %self.subject,
            serial = %self.serial,
            expires = %rfc3339(self.not_after),
            "bundle endpoint: {change} root"
        );
    }
}

/// The bundle as served: its JSON and what it was made from.
#[derive(Debug)]
pub struct Served {
    pub json: Bytes,
    pub sequence: u64,
    pub roots: Vec<Root>,
    /// When the mount was last read successfully.
    pub read_at: SystemTime,
}

/// Why a read of the mount was not served.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(
        "the PKI mount lists no unexpired root (self-signed issuer); an empty bundle would \
         make every peer distrust this mesh"
    )]
    NoRoots,
    #[error("a root of the PKI mount cannot be read: {0}")]
    BadRoot(String),
    #[error("the roots cannot be written as a SPIFFE bundle: {0}")]
    Format(#[from] BundleError),
}

/// What a successful update did.
#[derive(Debug, PartialEq, Eq)]
pub enum Update {
    Unchanged,
    Changed { sequence: u64, roots: usize },
}

/// The bundle shared by the refresher and the server.
pub struct BundleState {
    current: RwLock<Option<Arc<Served>>>,
    refresh_hint: Duration,
}

impl BundleState {
    pub fn new(refresh_hint: Duration) -> Self {
        Self {
            current: RwLock::new(None),
            refresh_hint,
        }
    }

    /// The bundle to serve, if a read has succeeded yet.
    pub fn get(&self) -> Option<Arc<Served>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adopts the roots (PEM) a read of the mount found, read at `now`;
    /// logs every root added and removed. On an error the bundle served
    /// stays as it was.
    pub fn update(&self, pems: &[String], now: SystemTime) -> Result<Update, UpdateError> {
        let mut roots = pems
            .iter()
            .map(|p| Root::from_pem(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(UpdateError::BadRoot)?;
        // One order for every replica: oldest first.
        roots.sort_by(|a, b| (a.not_before, &a.der).cmp(&(b.not_before, &b.der)));
        roots.dedup_by(|a, b| a.der == b.der);
        if roots.is_empty() {
            return Err(UpdateError::NoRoots);
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let previous = current.clone();
        if let Some(prev) = previous.as_ref().filter(|p| p.roots == roots) {
            *current = Some(Arc::new(Served {
                json: prev.json.clone(),
                sequence: prev.sequence,
                roots,
                read_at: now,
            }));
            return Ok(Update::Unchanged);
        }
        let derived = derived_sequence(&roots);
        let sequence = match &previous {
            Some(p) => derived.max(p.sequence.saturating_add(1)),
            None => derived,
        };
        let ders: Vec<Vec<u8>> = roots.iter().map(|r| r.der.clone()).collect();
        let json = spiffe_bundle::to_json(&ders, sequence, self.refresh_hint)?;
        let old: &[Root] = previous.as_ref().map(|p| &p.roots[..]).unwrap_or_default();
        for r in roots.iter().filter(|r| !old.contains(r)) {
            r.log("added");
        }
        for r in old.iter().filter(|r| !roots.contains(r)) {
            r.log("removed");
        }
        let n = roots.len();
        tracing::info!(
            roots = n,
            spiffe_sequence = sequence,
            "bundle endpoint: serving {n} root(s), spiffe_sequence {sequence}"
        );
        *current = Some(Arc::new(Served {
            json: Bytes::from(json),
            sequence,
            roots,
            read_at: now,
        }));
        Ok(Update::Changed { sequence, roots: n })
    }
}

/// The NotBefore of the newest root plus that of the oldest (Unix seconds):
/// see the module's documentation. `roots` is sorted oldest first.
fn derived_sequence(roots: &[Root]) -> u64 {
    let secs = |r: Option<&Root>| r.map(|r| r.not_before.max(0).unsigned_abs()).unwrap_or(0);
    secs(roots.last()).saturating_add(secs(roots.first()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(days_ago: i64) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let now = ::time::OffsetDateTime::now_utc();
        params.not_before = now - ::time::Duration::days(days_ago);
        params.not_after = now + ::time::Duration::days(3650);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("root {days_ago}"));
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    fn sequence(state: &BundleState) -> u64 {
        state.get().unwrap().sequence
    }

    #[test]
    fn a_rotation_raises_the_sequence_and_replicas_agree() {
        let (old, new) = (root(30), root(1));
        let now = SystemTime::now();
        let a = BundleState::new(Duration::from_secs(300));
        assert!(matches!(
            a.update(std::slice::from_ref(&old), now),
            Ok(Update::Changed { roots: 1, .. })
        ));
        let s1 = sequence(&a);
        assert_eq!(
            a.update(std::slice::from_ref(&old), now).unwrap(),
            Update::Unchanged
        );
        assert_eq!(sequence(&a), s1);

        let both = [new.clone(), old.clone()];
        a.update(&both, now).unwrap();
        let s2 = sequence(&a);
        assert!(s2 > s1, "{s2} > {s1}");
        // A replica that starts now serves the same bundle, byte for byte.
        let b = BundleState::new(Duration::from_secs(300));
        b.update(&[old.clone(), new.clone()], now).unwrap();
        assert_eq!(sequence(&b), s2);
        assert_eq!(b.get().unwrap().json, a.get().unwrap().json);

        a.update(std::slice::from_ref(&new), now).unwrap();
        let s3 = sequence(&a);
        assert!(s3 > s2, "{s3} > {s2}");
        let c = BundleState::new(Duration::from_secs(300));
        c.update(std::slice::from_ref(&new), now).unwrap();
        assert_eq!(sequence(&c), s3);
    }

    #[test]
    fn any_change_raises_the_sequence_and_nothing_empty_is_served() {
        let (old, new) = (root(30), root(1));
        let now = SystemTime::now();
        let a = BundleState::new(Duration::from_secs(60));
        a.update(&[old.clone(), new.clone()], now).unwrap();
        let s1 = sequence(&a);
        // The newest root deleted: the derived value falls, the sequence does not.
        a.update(std::slice::from_ref(&old), now).unwrap();
        assert!(sequence(&a) > s1);

        assert!(matches!(a.update(&[], now), Err(UpdateError::NoRoots)));
        assert!(matches!(
            a.update(&["junk".into()], now),
            Err(UpdateError::BadRoot(_))
        ));
        let served = a.get().unwrap();
        assert_eq!(served.roots.len(), 1, "the last good bundle stays");
        let parsed = spiffe_bundle::parse(&served.json).unwrap();
        assert_eq!(parsed.refresh_hint, Some(Duration::from_secs(60)));
        assert_eq!(parsed.sequence, Some(served.sequence));
    }
}

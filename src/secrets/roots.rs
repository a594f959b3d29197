//! The trust bundle served as `ROOTCA`.
//!
//! It is the union of the roots that the certificates in use chain to. When
//! the CA's root changes, certificates renewed under the new root bring it in
//! while the others still hold the old one, so both are served; the old root
//! leaves the bundle when no certificate in use chains to it any more, or when
//! it expires.

use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// A set of trusted roots, PEM, in a stable order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootBundle {
    pub pems: Vec<String>,
}

impl RootBundle {
    /// The bundle as served in `trusted_ca`.
    pub fn pem(&self) -> String {
        self.pems.concat()
    }

    /// Changes exactly when the bundle does.
    pub fn version(&self) -> String {
        let d = Sha256::digest(self.pem().as_bytes());
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Builds the bundle from the roots of every certificate in use, newest
    /// first, without duplicates or expired roots.
    pub fn from_in_use<'a>(
        roots_in_use: impl IntoIterator<Item = &'a (String, SystemTime)>,
        now: SystemTime,
    ) -> Self {
        let mut all: Vec<&(String, SystemTime)> = roots_in_use
            .into_iter()
            .filter(|(_, exp)| *exp > now)
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut pems: Vec<String> = Vec::new();
        for (pem, _) in all {
            if !pems.contains(pem) {
                pems.push(pem.clone());
            }
        }
        Self { pems }
    }
}

/// The current bundle; streams serving `ROOTCA` watch it.
pub type RootsWatch = watch::Receiver<Arc<RootBundle>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn union_of_roots_in_use_without_expired_or_duplicates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let old = ("OLD".to_string(), now + Duration::from_secs(10));
        let new = ("NEW".to_string(), now + Duration::from_secs(100));
        let dead = ("DEAD".to_string(), now - Duration::from_secs(1));
        let b = RootBundle::from_in_use([&old, &new, &old, &dead], now);
        assert_eq!(b.pems, ["NEW", "OLD"]);
        let only_new = RootBundle::from_in_use([&new], now);
        assert_ne!(b.version(), only_new.version());
        assert_eq!(only_new.pem(), "NEW");
    }
}

//! The optional file of extra roots (`TRUST_EXTRA_ROOTS`): PEM certificates
//! added to `ROOTCA`, e.g. the roots of another Vault cluster or trust domain
//! during a migration. Re-read when its content changes.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::bundle::RootCert;

/// Largest extra-roots file read (a bundle of a few hundred roots).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why the file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TRUST_EXTRA_ROOTS {path}: {reason}")]
pub struct ExtraRootsError {
    pub path: PathBuf,
    pub reason: String,
}

/// The file and what was last read from it.
pub(super) struct ExtraRoots {
    path: PathBuf,
    /// SHA-256 of the content last read, good or bad.
    seen: Option<[u8; 32]>,
}

impl ExtraRoots {
    pub fn new(path: PathBuf) -> Self {
        Self { path, seen: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file. `Ok(None)` when its content is the same as last time;
    /// `Ok(Some(roots))` when it changed (an empty file holds no roots).
    pub fn read_if_changed(&mut self) -> Result<Option<Vec<RootCert>>, ExtraRootsError> {
        let err = |reason: String| ExtraRootsError {
            path: self.path.clone(),
            reason,
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| err(format!("cannot read: {e}")))?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(err(format!(
                "is {} bytes, more than the {MAX_FILE_BYTES} read",
                meta.len()
            )));
        }
        let text =
            std::fs::read_to_string(&self.path).map_err(|e| err(format!("cannot read: {e}")))?;
        let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if self.seen == Some(hash) {
            return Ok(None);
        }
        self.seen = Some(hash);
        if text.trim().is_empty() {
            return Ok(Some(Vec::new()));
        }
        let roots = RootCert::parse_all(&text).map_err(|e| err(e.to_string()))?;
        if roots.is_empty() {
            return Err(err("holds no PEM certificate".into()));
        }
        Ok(Some(roots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_changes_only_and_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra.pem");
        let mut extra = ExtraRoots::new(path.clone());
        let e = extra.read_if_changed().unwrap_err();
        assert!(e.to_string().starts_with("TRUST_EXTRA_ROOTS "), "{e}");

        let ca = crate::ca::local::LocalCa::new(None, "td").unwrap();
        std::fs::write(&path, ca.root_pem()).unwrap();
        assert_eq!(extra.read_if_changed().unwrap().unwrap().len(), 1);
        assert_eq!(extra.read_if_changed().unwrap(), None, "unchanged");

        std::fs::write(&path, "not a certificate").unwrap();
        assert!(extra.read_if_changed().is_err());
        // The same bad content is not reported again.
        assert_eq!(extra.read_if_changed().unwrap(), None);

        std::fs::write(&path, "\n").unwrap();
        assert_eq!(extra.read_if_changed().unwrap(), Some(Vec::new()));
    }
}

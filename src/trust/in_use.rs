//! A certificate's hold on the roots it chains to: while it is in use they
//! stay in the bundle; once it is dropped, their removal clock starts.

use std::sync::Weak;

use super::TrustBundle;

/// Keeps the roots of one certificate in the bundle while the certificate
/// is in use; dropping it starts their removal clock.
pub struct RootsInUse {
    pub(super) trust: Weak<TrustBundle>,
    pub(super) ids: Vec<[u8; 32]>,
}

impl RootsInUse {
    /// A handle that holds nothing, for tests that build secrets by hand.
    #[cfg(test)]
    pub(crate) fn detached() -> Self {
        Self {
            trust: Weak::new(),
            ids: Vec::new(),
        }
    }
}

impl std::fmt::Debug for RootsInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RootsInUse({} roots)", self.ids.len())
    }
}

impl Drop for RootsInUse {
    fn drop(&mut self) {
        let Some(trust) = self.trust.upgrade() else {
            return;
        };
        let mut st = trust.lock();
        for id in &self.ids {
            if let Some(k) = st.roots.get_mut(id) {
                k.in_use = k.in_use.saturating_sub(1);
            }
        }
        trust.recompute(&mut st);
        drop(st);
        // Re-arm the task's timer for the removal that may now come.
        trust.wake.notify_one();
    }
}

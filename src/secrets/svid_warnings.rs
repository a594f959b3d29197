//! The warning about a served leaf that breaks X.509-SVID rules (see
//! [`crate::crypto::svid_rules`]): one per identity per
//! [`SVID_WARN_INTERVAL`], and at once when the rules an identity's leaf
//! breaks change. The cause is the CA's configuration, which applies to
//! every identity alike; repeating it at every renewal of every identity
//! would bury the rest of the log, and saying it once per identity names
//! each one affected.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::crypto::svid_rules::{describe, Breach, SvidRule};
use crate::identity::SpiffeId;

/// At most one warning per identity per this interval, while the rules it
/// breaks stay the same.
pub const SVID_WARN_INTERVAL: Duration = Duration::from_secs(600);

/// When each identity was last warned about, and for which rules. Entries
/// older than the interval are dropped on each warning, so the map holds
/// only the identities warned about in the last interval.
#[derive(Default)]
pub(super) struct SvidWarnings(Mutex<HashMap<SpiffeId, (Instant, Vec<SvidRule>)>>);

impl SvidWarnings {
    /// Logs the warning about `breaches` of `identity`'s new leaf (serial
    /// `serial`, issued by `ca`) unless the same was logged for it less than
    /// [`SVID_WARN_INTERVAL`] ago. Returns whether it logged.
    pub fn warn(&self, identity: &SpiffeId, serial: &str, ca: &str, breaches: &[Breach]) -> bool {
        if breaches.is_empty() || !self.due(identity, breaches) {
            return false;
        }
        tracing::warn!(
            identity = %identity,
            serial,
            "the certificate from {ca} breaks X.509-SVID rules that SPIFFE clients or \
             certificate linters check; serving it, as Envoy accepts it: {}",
            describe(breaches)
        );
        true
    }

    fn due(&self, identity: &SpiffeId, breaches: &[Breach]) -> bool {
        let now = Instant::now();
        let rules: Vec<SvidRule> = breaches.iter().map(|b| b.rule).collect();
        let mut warned = self.0.lock().unwrap_or_else(|e| e.into_inner());
        warned.retain(|_, (at, _)| now.duration_since(*at) < SVID_WARN_INTERVAL);
        if warned.get(identity).is_some_and(|(_, r)| *r == rules) {
            return false;
        }
        warned.insert(identity.clone(), (now, rules));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breach(rule: SvidRule) -> Breach {
        Breach {
            rule,
            found: format!("{rule:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_warning_per_identity_and_interval_and_at_once_for_other_rules() {
        let w = SvidWarnings::default();
        let a = SpiffeId("spiffe://cluster.local/ns/default/sa/a".into());
        let b = SpiffeId("spiffe://cluster.local/ns/default/sa/b".into());
        let ke = [breach(SvidRule::NoKeyEnciphermentOnEc)];
        assert!(w.warn(&a, "01", "local CA", &ke));
        assert!(
            !w.warn(&a, "02", "local CA", &ke),
            "held back within the interval"
        );
        assert!(
            w.warn(&b, "03", "local CA", &ke),
            "another identity is warned"
        );
        let more = [
            breach(SvidRule::BasicConstraints),
            breach(SvidRule::NoKeyEnciphermentOnEc),
        ];
        assert!(
            w.warn(&a, "04", "local CA", &more),
            "other rules are warned at once"
        );
        assert!(!w.warn(&a, "05", "local CA", &more));
        tokio::time::advance(SVID_WARN_INTERVAL).await;
        assert!(
            w.warn(&a, "06", "local CA", &more),
            "again after the interval"
        );
        assert!(!w.warn(&a, "07", "local CA", &[]), "nothing to warn about");
        assert_eq!(
            w.0.lock().unwrap().len(),
            1,
            "entries past the interval are dropped"
        );
    }
}

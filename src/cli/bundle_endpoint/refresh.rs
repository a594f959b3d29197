//! Reading the PKI mount's roots: at start, every `TRUST_REFRESH_INTERVAL`,
//! and after a failure again with back-off (from 1 s, at most 30 s or the
//! interval apart), one log line per failure saying what failed, where, what
//! is served meanwhile and what to do.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::bundle::{BundleState, Update, UpdateError};
use crate::backoff::Backoff;
use crate::ca::vault::VaultCa;
use crate::ca::CaClient;
use crate::clock::rfc3339;

/// First retry after a failed read.
const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest wait between retries (unless the interval is shorter).
const RETRY_CAP: Duration = Duration::from_secs(30);

/// Reads the mount into `state` forever.
pub async fn run(ca: Arc<VaultCa>, state: Arc<BundleState>, mount: String, interval: Duration) {
    let mut backoff = Backoff::new(RETRY_BASE.min(interval), RETRY_CAP.min(interval));
    loop {
        let wait = match read_once(&ca, &state, &mount).await {
            Ok(()) => {
                backoff.reset();
                interval
            }
            Err(why) => {
                let retry = backoff.next_delay();
                let serving = match state.get() {
                    Some(s) => format!(
                        "still serving the last good bundle ({} root(s), spiffe_sequence {}, \
                         read at {})",
                        s.roots.len(),
                        s.sequence,
                        rfc3339(s.read_at)
                    ),
                    None => "answering 503 until a read succeeds".to_string(),
                };
                tracing::warn!(
                    "bundle endpoint: {why}; {serving}; retrying in {}s",
                    retry.as_secs_f64().ceil() as u64
                );
                retry
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One read of the mount, adopted; or why not, with what to do about it.
async fn read_once(ca: &VaultCa, state: &BundleState, mount: &str) -> Result<(), String> {
    let pems = ca.trust_roots().await.map_err(|e| {
        format!(
            "{} (check that Vault is reachable from here, unsealed, and that the mount exists)",
            e.message()
        )
    })?;
    match state.update(&pems, SystemTime::now()) {
        Ok(Update::Unchanged) => {
            tracing::debug!(
                mount,
                "bundle endpoint: the PKI mount's roots are unchanged"
            );
            Ok(())
        }
        Ok(Update::Changed { .. }) => Ok(()),
        Err(e @ UpdateError::NoRoots) => Err(format!(
            "PKI mount {mount} ({}): {e}; make or import a root \
             (`bao write {mount}/root/generate/internal common_name=...`)",
            ca.describe()
        )),
        Err(e) => Err(format!("PKI mount {mount} ({}): {e}", ca.describe())),
    }
}

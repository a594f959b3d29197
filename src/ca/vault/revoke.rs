//! Ending Vault tokens that are no longer needed: `auth/token/revoke-self`,
//! best-effort, so that tokens do not pile up in Vault for their whole lease
//! (a JWT replaced, an identity evicted, the agent shutting down). Batch
//! tokens never get here: they cannot be revoked and need no cleanup.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use zeroize::Zeroizing;

use super::http::VaultHttp;
use crate::ca::CaError;

/// Revocations at shutdown run at most this many at once ...
const REVOKE_CONCURRENCY: usize = 16;
/// ... and stop after this long: shutdown is not held up by a slow Vault
/// (the tokens left then end with their lease).
pub const SHUTDOWN_REVOKE_BUDGET: Duration = Duration::from_secs(2);

/// A token to revoke, with nothing else of its slot.
pub(super) struct Revocable(pub(super) Arc<Zeroizing<String>>);

/// Revokes `token` with `auth/token/revoke-self`. Best-effort: a failure is
/// logged (without the token) and the token ends with its lease.
pub(super) async fn revoke(http: &VaultHttp, token: Revocable) -> Result<(), CaError> {
    http.call(
        reqwest::Method::POST,
        "auth/token/revoke-self",
        Some(&token.0),
        Some(&json!({})),
    )
    .await
    .map(drop)
}

pub(super) fn revoke_in_background(http: &VaultHttp, tokens: Vec<Revocable>) {
    if tokens.is_empty() {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let http = http.clone();
    rt.spawn(async move {
        let n = tokens.len();
        let failed = revoke_all(&http, tokens).await;
        tracing::debug!(
            revoked = n - failed,
            failed,
            "revoked Vault tokens that are no longer used"
        );
    });
}

/// Revokes `tokens`, some at once; returns how many failed.
pub(super) async fn revoke_all(http: &VaultHttp, tokens: Vec<Revocable>) -> usize {
    use futures::StreamExt;
    futures::stream::iter(tokens)
        .map(|t| revoke(http, t))
        .buffer_unordered(REVOKE_CONCURRENCY)
        .filter(|r| std::future::ready(r.is_err()))
        .inspect(|r| {
            if let Err(e) = r {
                tracing::debug!("revoking a Vault token failed: {}", e.message());
            }
        })
        .count()
        .await
}

//! Certificate files (`OUTPUT_CERTS`, istio-agent's name): the workload's
//! `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem`, for workloads that
//! speak neither SDS nor the Workload API, and beside them the roots of each
//! federated trust domain, `root-cert-<trust domain>.pem`. One-workload mode
//! only: the files hold the identity of the token at `WORKLOAD_TOKEN_PATH`,
//! from the same cache as SDS, rewritten on every rotation and every change
//! of this mesh's or a federated domain's roots; the file of a domain no
//! longer federated is removed.
//!
//! Writes are atomic, in the layout Kubernetes uses for secret volumes:
//!
//! ```text
//! OUTPUT_CERTS/..certs-<time>-<n>/{cert-chain.pem,key.pem,root-cert.pem,root-cert-<td>.pem}
//! OUTPUT_CERTS/..data          -> ..certs-<time>-<n>
//! OUTPUT_CERTS/cert-chain.pem  -> ..data/cert-chain.pem   (and each other one)
//! ```
//!
//! A new set is written into a fresh hidden directory, each file fsynced,
//! then the `..data` link is replaced by renaming a new link over it (one
//! atomic step for every file) and the directory is fsynced. So every
//! file a reader opens is complete, and a reader that resolves `..data` once
//! and reads the files under it always gets a key that matches its
//! certificate. The previous set stays until the next rotation, so a reader
//! that resolved `..data` just before a swap can finish reading.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::driver::credential::{
    expired_status, next_event, token_file_update, CredentialDue, Current, IdentityEvent,
};
use crate::endpoint::credential::{CredentialSource, TokenFile};
use crate::sds::all::trust_domains;
use crate::secrets::{rfc3339, SecretManager, Subscription};

mod files;

pub use files::{
    federated_root_cert, write_atomically, CertFiles, CERT_CHAIN, DATA_LINK, KEY, ROOT_CERT,
};

/// Back-off of a failed fetch or write.
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// Starts the writer when `OUTPUT_CERTS` is set (the configuration ensures
/// one-workload mode).
pub fn start(
    config: &crate::config::Config,
    manager: &Arc<SecretManager>,
    shutdown: &watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let dir = config.surfaces.output_certs.clone()?;
    let token_path = config.workload_token_path.clone()?;
    Some(tokio::spawn(run(
        dir,
        manager.clone(),
        token_path,
        shutdown.clone(),
    )))
}

/// Keeps the files in `dir` current for the workload whose token is at
/// `token_path`, until `shutdown`.
pub async fn run(
    dir: PathBuf,
    manager: Arc<SecretManager>,
    token_path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(dir = %dir.display(), "writing the workload's certificate files (OUTPUT_CERTS)");
    let mut backoff = Backoff::new(RETRY.0, RETRY.1);
    loop {
        let outcome = tokio::select! {
            o = serve(&dir, &manager, &token_path, &mut backoff) => o,
            _ = shutdown.wait_for(|v| *v) => return,
        };
        let delay = backoff.next_delay();
        tracing::error!(
            dir = %dir.display(),
            "certificate files: {outcome}; trying again in {:.1}s",
            delay.as_secs_f64()
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
    }
}

/// Subscribes and writes on every change; returns why it stopped.
async fn serve(
    dir: &Path,
    manager: &Arc<SecretManager>,
    token_path: &Path,
    backoff: &mut Backoff,
) -> String {
    let clock = manager.clock();
    let source = CredentialSource::TokenFile(TokenFile::new(token_path.to_path_buf()));
    let credential = match source.get(&clock) {
        Ok(c) => c,
        Err(status) => return status.message().to_string(),
    };
    // Held while the files are kept current: it keeps the workload's JWT
    // among those its identity is renewed with.
    let sub: Subscription = match manager.subscribe(&credential).await {
        Ok(s) => s,
        Err(e) => return format!("cannot get the certificate: {e}"),
    };
    let mut current = Some(Current::new(credential, sub, &clock));
    let mut written: Option<(String, String)> = None;
    loop {
        let Some(c) = current.as_mut() else {
            return "no subscription".into();
        };
        if let Some(status) = c.rejection() {
            return status.message().to_string();
        }
        let state = c.sub.secret.borrow_and_update().clone();
        if let Some(reason) = state.closed {
            return reason;
        }
        if let Some(secret) = state.secret {
            let roots = state.roots.clone();
            let version = (secret.cert_version(), roots.all_version());
            if written.as_ref() != Some(&version) {
                let own = secret.identity.trust_domain();
                let federated: Vec<(String, String)> = trust_domains(own, &roots)
                    .into_iter()
                    .filter(|(td, _)| *td != own)
                    .map(|(td, pems)| (td.to_string(), pems.concat()))
                    .collect();
                let domains: Vec<&str> = federated.iter().map(|(td, _)| td.as_str()).collect();
                let domains = domains.join(",");
                let (d, s, r) = (dir.to_path_buf(), secret.clone(), roots.clone());
                let result = tokio::task::spawn_blocking(move || {
                    write_atomically(
                        &d,
                        &CertFiles {
                            federated: &federated,
                            chain_pem: &s.chain_pem,
                            key_pem: s.key.pkcs8_pem(),
                            roots_pem: &r.pem(),
                        },
                    )
                })
                .await;
                match result {
                    Ok(Ok(set)) => {
                        tracing::info!(
                            dir = %dir.display(),
                            set = %set.file_name().unwrap_or_default().to_string_lossy(),
                            identity = %secret.identity,
                            serial = %secret.leaf.serial_hex,
                            expires = %rfc3339(secret.leaf.not_after),
                            roots = roots.pems.len(),
                            federated = %domains,
                            "wrote the certificate files ({CERT_CHAIN}, {KEY}, {ROOT_CERT})"
                        );
                        written = Some(version);
                        backoff.reset();
                    }
                    Ok(Err(e)) => {
                        return format!("cannot write to {}: {e}", dir.display());
                    }
                    Err(e) => return format!("the writing task failed: {e}"),
                }
            }
        }
        match next_event(&mut current, true).await {
            IdentityEvent::Changed => {}
            IdentityEvent::Dropped => return "the identity was dropped".into(),
            IdentityEvent::Credential(CredentialDue::Expired(exp)) => {
                return expired_status(exp, &source).message().to_string()
            }
            IdentityEvent::Credential(CredentialDue::Refresh) => {
                // kubelet replaced the token: the new one is proven, then
                // the files are kept from its subscription.
                if let Some(new) = token_file_update(&current, &source, &clock) {
                    match manager.subscribe(&new).await {
                        Ok(sub) => current = Some(Current::new(new, sub, &clock)),
                        Err(e) => return format!("cannot prove the new token: {e}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! Certificate files (`OUTPUT_CERTS`, istio-agent's name): the workload's
//! `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem`, for workloads that
//! speak neither SDS nor the Workload API. One-workload mode only: the files
//! hold the identity of the token at `WORKLOAD_TOKEN_PATH`, from the same
//! cache as SDS, rewritten on every rotation and root change.
//!
//! Writes are atomic, in the layout Kubernetes uses for secret volumes:
//!
//! ```text
//! OUTPUT_CERTS/..certs-<time>-<n>/{cert-chain.pem,key.pem,root-cert.pem}
//! OUTPUT_CERTS/..data          -> ..certs-<time>-<n>
//! OUTPUT_CERTS/cert-chain.pem  -> ..data/cert-chain.pem   (and the other two)
//! ```
//!
//! A new set is written into a fresh hidden directory, each file fsynced,
//! then the `..data` link is replaced by renaming a new link over it (one
//! atomic step for all three files) and the directory is fsynced. So every
//! file a reader opens is complete, and a reader that resolves `..data` once
//! and reads the files under it always gets a key that matches its
//! certificate. The previous set stays until the next rotation, so a reader
//! that resolved `..data` just before a swap can finish reading.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::driver::credential::{
    expired_status, next_event, token_file_update, CredentialDue, Current, IdentityEvent,
};
use crate::endpoint::credential::CredentialSource;
use crate::secrets::{rfc3339, SecretManager, Subscription};

/// The certificate chain, leaf first (no root).
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The private key, PKCS#8 PEM, mode 0600.
pub const KEY: &str = "key.pem";
/// The trust bundle.
pub const ROOT_CERT: &str = "root-cert.pem";
/// The link to the current set.
pub const DATA_LINK: &str = "..data";
/// Prefix of the hidden directories holding each set.
const SET_PREFIX: &str = "..certs-";
const TMP_SUFFIX: &str = ".tmp";

/// Back-off of a failed fetch or write.
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// One set of files.
pub struct CertFiles<'a> {
    pub chain_pem: &'a str,
    pub key_pem: &'a str,
    pub roots_pem: &'a str,
}

/// Writes `files` into `dir` atomically (see the module documentation) and
/// removes sets older than the previous one. Returns the new set's directory.
pub fn write_atomically(dir: &Path, files: &CertFiles<'_>) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let set = new_set_dir(dir)?;
    let written = (|| {
        write_synced(&set.join(CERT_CHAIN), files.chain_pem, 0o644)?;
        write_synced(&set.join(KEY), files.key_pem, 0o600)?;
        write_synced(&set.join(ROOT_CERT), files.roots_pem, 0o644)?;
        fs::File::open(&set)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&set);
        return Err(e);
    }
    let set_name = set.file_name().expect("a set has a name").to_owned();
    let previous = fs::read_link(dir.join(DATA_LINK)).ok();
    replace_link(dir, DATA_LINK, Path::new(&set_name))?;
    for name in [CERT_CHAIN, KEY, ROOT_CERT] {
        let target = Path::new(DATA_LINK).join(name);
        if fs::read_link(dir.join(name)).ok().as_deref() != Some(target.as_path()) {
            replace_link(dir, name, &target)?;
        }
    }
    fs::File::open(dir)?.sync_all()?;
    // Keep the current and the previous set; remove older ones and leftovers.
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let is_ours = name.to_string_lossy().starts_with(SET_PREFIX)
            || name.to_string_lossy().ends_with(TMP_SUFFIX)
                && name.to_string_lossy().starts_with("..");
        if is_ours && name != set_name && Some(Path::new(&name)) != previous.as_deref() {
            let p = entry.path();
            let removed = if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            if let Err(e) = removed {
                tracing::warn!(path = %p.display(), "cannot remove an old certificate set: {e}");
            }
        }
    }
    Ok(set)
}

/// A fresh hidden directory (mode 0755) for a new set.
fn new_set_dir(dir: &Path) -> io::Result<PathBuf> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    loop {
        let p = dir.join(format!(
            "{SET_PREFIX}{millis}-{:08x}",
            rand::random::<u32>()
        ));
        match fs::create_dir(&p) {
            Ok(()) => {
                // Set on the directory just made, opened without following a
                // symlink: a path could be swapped for a link in between.
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(&p)?
                    .set_permissions(fs::Permissions::from_mode(0o755))?;
                return Ok(p);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Creates `path` with `mode` (never wider, whatever the umask allows), writes
/// `data` and fsyncs it.
fn write_synced(path: &Path, data: &str, mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data.as_bytes())?;
    f.sync_all()
}

/// Points `dir/name` at `target` in one step: a new link renamed over it.
fn replace_link(dir: &Path, name: &str, target: &Path) -> io::Result<()> {
    let tmp = dir.join(format!("..{name}{TMP_SUFFIX}"));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, dir.join(name))
}

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
    let credential = match CredentialSource::TokenFile(token_path.to_path_buf()).get(&clock) {
        Ok(c) => c,
        Err(status) => return status.message().to_string(),
    };
    // Held while the files are kept current: it keeps the workload's JWT
    // among those its identity is renewed with.
    let sub: Subscription = match manager.subscribe(&credential).await {
        Ok(s) => s,
        Err(e) => return format!("cannot get the certificate: {e}"),
    };
    let source = CredentialSource::TokenFile(token_path.to_path_buf());
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
            let version = (secret.cert_version(), roots.version());
            if written.as_ref() != Some(&version) {
                let (d, s, r) = (dir.to_path_buf(), secret.clone(), roots.clone());
                let result = tokio::task::spawn_blocking(move || {
                    write_atomically(
                        &d,
                        &CertFiles {
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
mod tests {
    use super::*;

    fn set(chain: &str) -> CertFiles<'_> {
        CertFiles {
            chain_pem: chain,
            key_pem: "KEY",
            roots_pem: "ROOTS",
        }
    }

    #[test]
    fn sets_are_swapped_by_one_link_and_old_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        // A file of istio-agent's layout is replaced; a stranger's file stays.
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join(KEY), "old plain file").unwrap();
        fs::write(out.join("other.txt"), "not ours").unwrap();

        let first = write_atomically(&out, &set("ONE")).unwrap();
        assert_eq!(fs::read_to_string(out.join(CERT_CHAIN)).unwrap(), "ONE");
        assert_eq!(fs::read_to_string(out.join(KEY)).unwrap(), "KEY");
        assert_eq!(fs::read_to_string(out.join(ROOT_CERT)).unwrap(), "ROOTS");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.join(KEY)), 0o600);
        assert_eq!(mode(&out.join(CERT_CHAIN)), 0o644);
        assert_eq!(mode(&out.join(ROOT_CERT)), 0o644);

        let second = write_atomically(&out, &set("TWO")).unwrap();
        let third = write_atomically(&out, &set("THREE")).unwrap();
        assert_eq!(fs::read_to_string(out.join(CERT_CHAIN)).unwrap(), "THREE");
        assert!(
            !first.exists(),
            "sets older than the previous one are removed"
        );
        assert!(
            second.exists(),
            "the previous set stays for readers mid-read"
        );
        assert!(third.exists());
        assert_eq!(
            fs::read_link(out.join(DATA_LINK)).unwrap(),
            Path::new(third.file_name().unwrap())
        );
        assert_eq!(
            fs::read_to_string(out.join("other.txt")).unwrap(),
            "not ours"
        );
        let leftovers: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(TMP_SUFFIX))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

//! The certificate files and how a set of them is written: atomically, in
//! the layout Kubernetes uses for secret volumes (see [`super`]).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The certificate chain, leaf first (no root).
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The private key, PKCS#8 PEM, mode 0600.
pub const KEY: &str = "key.pem";
/// The trust bundle.
pub const ROOT_CERT: &str = "root-cert.pem";
/// What the name of a federated trust domain's roots starts with.
const FEDERATED_PREFIX: &str = "root-cert-";
/// The link to the current set.
pub const DATA_LINK: &str = "..data";
/// Prefix of the hidden directories holding each set.
const SET_PREFIX: &str = "..certs-";
const TMP_SUFFIX: &str = ".tmp";

/// One set of files.
pub struct CertFiles<'a> {
    pub chain_pem: &'a str,
    pub key_pem: &'a str,
    pub roots_pem: &'a str,
    /// Each federated trust domain (its name, without the scheme) and its
    /// roots, written to [`federated_root_cert`].
    pub federated: &'a [(String, String)],
}

/// The file of a federated trust domain's roots, beside `root-cert.pem`:
/// `root-cert-other.example.pem`.
pub fn federated_root_cert(trust_domain: &str) -> String {
    format!("{FEDERATED_PREFIX}{trust_domain}.pem")
}

/// Writes `files` into `dir` atomically (see the module documentation) and
/// removes sets older than the previous one. Returns the new set's directory.
pub fn write_atomically(dir: &Path, files: &CertFiles<'_>) -> io::Result<PathBuf> {
    // Trust domain names are checked where they are read; a name that would
    // leave the directory is refused here all the same.
    if let Some((td, _)) = files
        .federated
        .iter()
        .find(|(td, _)| td.is_empty() || td.contains('/') || td.contains('\0'))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{td:?} cannot name a file"),
        ));
    }
    let federated: Vec<String> = files
        .federated
        .iter()
        .map(|(td, _)| federated_root_cert(td))
        .collect();
    fs::create_dir_all(dir)?;
    let set = new_set_dir(dir)?;
    let written = (|| {
        write_synced(&set.join(CERT_CHAIN), files.chain_pem, 0o644)?;
        write_synced(&set.join(KEY), files.key_pem, 0o600)?;
        write_synced(&set.join(ROOT_CERT), files.roots_pem, 0o644)?;
        for ((_, pem), name) in files.federated.iter().zip(&federated) {
            write_synced(&set.join(name), pem, 0o644)?;
        }
        fs::File::open(&set)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&set);
        return Err(e);
    }
    let set_name = set.file_name().expect("a set has a name").to_owned();
    let previous = fs::read_link(dir.join(DATA_LINK)).ok();
    replace_link(dir, DATA_LINK, Path::new(&set_name))?;
    let names = [CERT_CHAIN, KEY, ROOT_CERT].into_iter();
    for name in names.chain(federated.iter().map(String::as_str)) {
        let target = Path::new(DATA_LINK).join(name);
        if fs::read_link(dir.join(name)).ok().as_deref() != Some(target.as_path()) {
            replace_link(dir, name, &target)?;
        }
    }
    remove_unfederated(dir, &federated)?;
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

/// Removes the file of every trust domain no longer federated: our link
/// into `..data/` (which the swap left dangling), never a file of another's.
fn remove_unfederated(dir: &Path, federated: &[String]) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with(FEDERATED_PREFIX)
            && name.ends_with(".pem")
            && !federated.iter().any(|f| f == name)
            && fs::read_link(entry.path()).ok() == Some(Path::new(DATA_LINK).join(name));
        if ours {
            if let Err(e) = fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), "cannot remove the roots of a trust domain no longer federated: {e}");
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(chain: &str) -> CertFiles<'_> {
        CertFiles {
            chain_pem: chain,
            key_pem: "KEY",
            roots_pem: "ROOTS",
            federated: &[],
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

    #[test]
    fn each_federated_domain_has_a_file_that_changes_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        fs::create_dir_all(&out).unwrap();
        // A file of someone else's with a name like ours stays.
        fs::write(out.join("root-cert-mine.pem"), "not ours").unwrap();
        let fed = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let write = |federated: &[(String, String)]| {
            write_atomically(
                &out,
                &CertFiles {
                    federated,
                    ..set("CHAIN")
                },
            )
            .unwrap()
        };
        let read = |name: &str| fs::read_to_string(out.join(name)).ok();
        let listed = || {
            let mut v: Vec<String> = fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("root-cert-"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(listed(), ["root-cert-mine.pem"]);

        write(&fed(&[("other.example", "A")]));
        assert_eq!(read("root-cert-other.example.pem").as_deref(), Some("A"));
        assert_eq!(read(ROOT_CERT).as_deref(), Some("ROOTS"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.join("root-cert-other.example.pem")), 0o644);
        assert_eq!(
            fs::read_link(out.join("root-cert-other.example.pem")).unwrap(),
            Path::new("..data/root-cert-other.example.pem"),
            "a link into the set, swapped with the others"
        );

        write(&fed(&[("other.example", "B"), ("third.example", "C")]));
        assert_eq!(read("root-cert-other.example.pem").as_deref(), Some("B"));
        assert_eq!(read("root-cert-third.example.pem").as_deref(), Some("C"));

        write(&fed(&[("third.example", "C")]));
        assert_eq!(
            listed(),
            ["root-cert-mine.pem", "root-cert-third.example.pem"],
            "other.example's file is gone, the stranger's stays"
        );
        write(&[]);
        assert_eq!(listed(), ["root-cert-mine.pem"]);
        assert_eq!(read(CERT_CHAIN).as_deref(), Some("CHAIN"));

        let bad = write_atomically(
            &out,
            &CertFiles {
                federated: &fed(&[("../x", "A")]),
                ..set("CHAIN")
            },
        );
        assert_eq!(bad.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}

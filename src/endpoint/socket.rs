//! The agent's Unix sockets and the directory that holds them.
//!
//! Whoever can write a socket's directory can put their own socket at its
//! path (the agent removes its socket on shutdown, and a directory writable
//! by others lets anyone unlink or rename it at any time) and then serve
//! every workload of the node their own roots. So, unless
//! `SOCKET_DIR_CHECK=pod` says the directory is a pod's own volume, the
//! directory must be owned by the agent's uid or root and writable by no one
//! else (no group or other write bit); otherwise the agent does not start.
//! Only the directory itself is checked, not its parents: in Kubernetes it is
//! a mount point, which cannot be renamed away.
//!
//! The socket itself is mode 0666: workloads run under other uids, and
//! connecting needs write permission on the socket. A stale socket (a dead
//! agent's, which refuses connections) is replaced; a live agent's is never
//! taken over; anything else at the path is left alone and refused.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

pub use crate::config::SocketDirCheck;

/// What makes a socket directory unsafe: someone besides the agent (and
/// root) can create, remove or rename entries in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DirProblem {
    #[error("every user can write it")]
    WorldWritable,
    #[error("its group can write it")]
    GroupWritable,
    #[error("it is owned by uid {0}, neither the agent's uid nor root")]
    OwnedByOther(u32),
}

/// Why a directory with permission bits `mode`, owned by `owner`, is unsafe
/// for the sockets of an agent running as `agent_uid`, if it is.
pub fn dir_problem(mode: u32, owner: u32, agent_uid: u32) -> Option<DirProblem> {
    if mode & 0o002 != 0 {
        Some(DirProblem::WorldWritable)
    } else if mode & 0o020 != 0 {
        Some(DirProblem::GroupWritable)
    } else if owner != agent_uid && owner != 0 {
        Some(DirProblem::OwnedByOther(owner))
    } else {
        None
    }
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create the socket directory {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing the socket directory {dir} of {setting} (mode {mode:04o}, owner uid {owner}): {problem}, \
         so another process could put its own socket there in the agent's place; make it owned by this \
         agent's uid {agent_uid} (or root) and writable only by its owner (chown {agent_uid} {dir} && \
         chmod 0755 {dir}), or, if it is a volume only this pod's containers mount (an emptyDir), set \
         SOCKET_DIR_CHECK=pod"
    )]
    UnsafeDir {
        dir: PathBuf,
        setting: &'static str,
        mode: u32,
        owner: u32,
        agent_uid: u32,
        problem: DirProblem,
    },
    #[error("another agent is already serving on {0}; stop it or choose another {1}")]
    InUse(PathBuf, &'static str),
    #[error(
        "{0} exists and is not a socket; refusing to replace it (remove it or choose another {1})"
    )]
    NotASocket(PathBuf, &'static str),
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the SDS socket at `path` with mode 0666, its directory checked as
/// `check` says.
pub fn bind(path: &Path, check: SocketDirCheck) -> Result<UnixListener, SocketError> {
    bind_for(path, "WORKLOAD_UDS_PATH", check)
}

/// Binds a socket of the agent at `path` (given by the setting `setting`,
/// named in errors) with mode 0666, its directory checked as `check` says.
pub fn bind_for(
    path: &Path,
    setting: &'static str,
    check: SocketDirCheck,
) -> Result<UnixListener, SocketError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // 0755 whatever the umask allows: a directory the agent makes is one it
    // would accept.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| SocketError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    if check == SocketDirCheck::Strict {
        check_dir(dir, setting)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live agent answers; a dead one's file refuses the connection.
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.to_path_buf(), setting)),
                Err(_) => {
                    tracing::info!(path = %path.display(), "removing stale socket left by a previous agent");
                    fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf(), setting)),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let bind_err = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    Ok(listener)
}

/// Refuses `dir` (the one `path` names, links followed) when someone besides
/// the agent and root can change its entries.
fn check_dir(dir: &Path, setting: &'static str) -> Result<(), SocketError> {
    let meta = fs::metadata(dir).map_err(|source| SocketError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let agent_uid = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    match dir_problem(mode, meta.uid(), agent_uid) {
        None => Ok(()),
        Some(problem) => Err(SocketError::UnsafeDir {
            dir: dir.to_path_buf(),
            setting,
            mode,
            owner: meta.uid(),
            agent_uid,
            problem,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: SocketDirCheck = SocketDirCheck::Strict;

    #[tokio::test]
    async fn replaces_stale_refuses_live_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/sock");
        let live = bind(&path, STRICT).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
        let made = fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o7777;
        assert_eq!(made, 0o755, "a directory the agent makes is 0755");
        assert!(matches!(bind(&path, STRICT), Err(SocketError::InUse(..))));
        drop(live); // the file stays, like a crashed agent's
        assert!(path.exists());
        let _again = bind(&path, STRICT).expect("a stale socket is replaced");

        let file = dir.path().join("plain");
        fs::write(&file, "x").unwrap();
        assert!(matches!(
            bind(&file, STRICT),
            Err(SocketError::NotASocket(..))
        ));
        assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    }

    #[test]
    fn only_the_owner_may_write_the_directory() {
        let agent = 65532;
        for (mode, owner, expect) in [
            (0o755, agent, None),
            (0o700, agent, None),
            (0o755, 0, None),
            (0o1755, agent, None),
            (0o2755, agent, None),
            (0o777, agent, Some(DirProblem::WorldWritable)),
            (0o1777, 0, Some(DirProblem::WorldWritable)),
            (0o757, agent, Some(DirProblem::WorldWritable)),
            (0o775, agent, Some(DirProblem::GroupWritable)),
            (0o2775, 0, Some(DirProblem::GroupWritable)),
            (0o755, 1000, Some(DirProblem::OwnedByOther(1000))),
        ] {
            assert_eq!(dir_problem(mode, owner, agent), expect, "{mode:o} {owner}");
        }
        // Root's agent accepts only root's directories.
        assert_eq!(
            dir_problem(0o755, agent, 0),
            Some(DirProblem::OwnedByOther(agent))
        );
    }

    #[tokio::test]
    async fn refuses_a_directory_others_can_write_unless_told_it_is_the_pods() {
        let dir = tempfile::tempdir().unwrap();
        let sds = dir.path().join("sds");
        fs::create_dir(&sds).unwrap();
        let path = sds.join("uds_path");
        for mode in [0o777, 0o1777, 0o775] {
            fs::set_permissions(&sds, fs::Permissions::from_mode(mode)).unwrap();
            let e = bind(&path, STRICT).unwrap_err();
            assert!(matches!(e, SocketError::UnsafeDir { .. }), "{e}");
            let m = e.to_string();
            for part in [
                sds.display().to_string(),
                format!("mode {mode:04o}"),
                "WORKLOAD_UDS_PATH".into(),
                "chmod 0755".into(),
                "SOCKET_DIR_CHECK=pod".into(),
            ] {
                assert!(m.contains(&part), "{part} not in {m}");
            }
            assert!(!path.exists(), "nothing is bound in a refused directory");
            let pod = bind(&path, SocketDirCheck::Pod).expect("a pod's own volume is not checked");
            drop(pod);
            fs::remove_file(&path).unwrap();
        }
        fs::set_permissions(&sds, fs::Permissions::from_mode(0o755)).unwrap();
        let _ok = bind(&path, STRICT).unwrap();
    }
}

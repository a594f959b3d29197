//! The SDS Unix socket: created world-writable (sidecars run under other
//! uids), replacing a stale file a dead agent left, but never stealing the
//! socket of a live one.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create the socket directory {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
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

/// Binds the SDS socket at `path` with mode 0666.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    bind_for(path, "WORKLOAD_UDS_PATH")
}

/// Binds a socket of the agent at `path` (given by the setting `setting`,
/// named in errors) with mode 0666.
pub fn bind_for(path: &Path, setting: &'static str) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|source| SocketError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replaces_stale_refuses_live_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/sock");
        let live = bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
        assert!(matches!(bind(&path), Err(SocketError::InUse(..))));
        drop(live); // the file stays, like a crashed agent's
        assert!(path.exists());
        let _again = bind(&path).expect("a stale socket is replaced");

        let file = dir.path().join("plain");
        fs::write(&file, "x").unwrap();
        assert!(matches!(bind(&file), Err(SocketError::NotASocket(..))));
        assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    }
}

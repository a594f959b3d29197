//! Who a connection belongs to: its peer, read from `SO_PEERCRED` of the
//! accepted socket as `SDS_PEER` says.
//!
//! - `cgroup` (the default): the control group of the connecting process,
//!   cut after its pod's component (`pod<uid>` with cgroupfs,
//!   `…-pod<uid>.slice` with systemd), so that the containers of one pod are
//!   one peer. A cgroup with no pod component (a process outside
//!   Kubernetes) is a peer of its own.
//! - `pid`: the connecting process, told apart from a later process given
//!   the same pid by its start time (`/proc/<pid>/stat`), so that a new
//!   process never inherits what an earlier one used.
//! - `uid`: the connecting process's user.
//!
//! When the kernel cannot say — `SO_PEERCRED` gives no pid (the client is
//! in a pid namespace the agent cannot see), `/proc/<pid>/cgroup` cannot be
//! read (the process is gone, or `/proc` is not the host's) — the peer is
//! the connection's uid; when even the uid is unknown, every such connection
//! is one peer. The agent must see the pods' processes (`hostPID`) for
//! `cgroup` and `pid` to tell pods apart.
//!
//! The files of `/proc` read here are made by the kernel from memory, with
//! no disk behind them, so they are read on the accepting task; each read
//! is bounded by [`MAX_PROC_READ`].

use std::fmt;
use std::io::Read;
use std::path::Path;

use crate::config::PeerMode;

/// A peer, as `SDS_PEER` names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerKey {
    Cgroup(Box<str>),
    /// A process: its pid and its start time, in clock ticks since boot.
    Pid(i32, u64),
    Uid(u32),
    /// No credentials at all: every such connection is this one peer.
    Unknown,
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Cgroup(c) => write!(f, "cgroup {c}"),
            PeerKey::Pid(p, _) => write!(f, "pid {p}"),
            PeerKey::Uid(u) => write!(f, "uid {u}"),
            PeerKey::Unknown => f.write_str("a peer of unknown credentials"),
        }
    }
}

/// What `SO_PEERCRED` said of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Cred {
    pub pid: Option<i32>,
    pub uid: u32,
}

/// The peer of a connection with credentials `cred` (`None`: unreadable),
/// `/proc` being at `proc`. `Err` holds the fallback and why `mode` could
/// not be followed.
pub fn attribute(
    mode: PeerMode,
    cred: Option<Cred>,
    proc: &Path,
) -> Result<PeerKey, (PeerKey, String)> {
    let Some(cred) = cred else {
        return Err((
            PeerKey::Unknown,
            "SO_PEERCRED could not be read".to_string(),
        ));
    };
    let fallback = |why: String| Err((PeerKey::Uid(cred.uid), why));
    let pid = match (mode, cred.pid) {
        (PeerMode::Uid, _) => return Ok(PeerKey::Uid(cred.uid)),
        (_, Some(pid)) if pid > 0 => pid,
        _ => return fallback("SO_PEERCRED gave no pid (another pid namespace)".into()),
    };
    let dir = proc.join(pid.to_string());
    if mode == PeerMode::Pid {
        let path = dir.join("stat");
        return match read_proc(&path) {
            Ok(text) => match start_time(&text) {
                Some(start) => Ok(PeerKey::Pid(pid, start)),
                None => fallback(format!("{} gives no start time", path.display())),
            },
            Err(e) => fallback(format!("cannot read {}: {e}", path.display())),
        };
    }
    let path = dir.join("cgroup");
    match read_proc(&path) {
        Ok(text) => match pod_cgroup(&text) {
            Some(cgroup) => Ok(PeerKey::Cgroup(cgroup.into())),
            None => fallback(format!("{} names no cgroup", path.display())),
        },
        Err(e) => fallback(format!("cannot read {}: {e}", path.display())),
    }
}

/// The most read of one file of `/proc`: a cgroup file lists one line per
/// hierarchy, each path at most `PATH_MAX`, far below this in practice.
pub const MAX_PROC_READ: u64 = 16 * 1024;

/// A file of `/proc`, at most [`MAX_PROC_READ`] bytes of it.
fn read_proc(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_PROC_READ)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// A process's start time from its `/proc/<pid>/stat`: the 22nd field,
/// counted after the command name, which is in parentheses and may hold
/// spaces and parentheses itself.
fn start_time(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The cgroup of a `/proc/<pid>/cgroup`: the unified hierarchy's (`0::`),
/// else the first listed, cut after its pod's component if it has one.
fn pod_cgroup(text: &str) -> Option<String> {
    let path_of = |line: &str| line.splitn(3, ':').nth(2).map(str::to_string);
    let path = text
        .lines()
        .find(|l| l.starts_with("0::"))
        .or_else(|| text.lines().find(|l| !l.trim().is_empty()))
        .and_then(path_of)?;
    let mut cut = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        cut.push('/');
        cut.push_str(part);
        if part.starts_with("pod") || part.contains("-pod") {
            return Some(cut);
        }
    }
    Some(if cut.is_empty() { "/".into() } else { path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_with(pid: i32, cgroup: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join(pid.to_string());
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("cgroup"), cgroup).unwrap();
        dir
    }

    #[test]
    fn a_pods_containers_are_one_peer() {
        for (text, want) in [
            (
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/cri-containerd-ab.scope\n",
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice",
            ),
            ("0::/kubepods/besteffort/pod1234/5678abcd\n", "/kubepods/besteffort/pod1234"),
            (
                "12:memory:/kubepods/pod99/c1\n1:name=systemd:/kubepods/pod99/c1\n",
                "/kubepods/pod99",
            ),
            ("0::/user.slice/user-1000.slice/session-2.scope\n", "/user.slice/user-1000.slice/session-2.scope"),
            ("0::/\n", "/"),
        ] {
            assert_eq!(pod_cgroup(text).as_deref(), Some(want), "{text}");
        }
        let proc = proc_with(7, "0::/kubepods/pod1/a\n");
        let cred = Some(Cred {
            pid: Some(7),
            uid: 5,
        });
        assert_eq!(
            attribute(PeerMode::Cgroup, cred, proc.path()),
            Ok(PeerKey::Cgroup("/kubepods/pod1".into()))
        );
        std::fs::write(
            proc.path().join("7/stat"),
            "7 (a (b) c) S 1 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 4242 1 1\n",
        )
        .unwrap();
        assert_eq!(
            attribute(PeerMode::Pid, cred, proc.path()),
            Ok(PeerKey::Pid(7, 4242))
        );
        assert_eq!(
            attribute(PeerMode::Uid, cred, proc.path()),
            Ok(PeerKey::Uid(5))
        );
    }

    #[test]
    fn a_pid_given_again_is_another_peer() {
        let me = std::process::id() as i32;
        let cred = Some(Cred {
            pid: Some(me),
            uid: 0,
        });
        let proc = Path::new("/proc");
        let PeerKey::Pid(pid, start) = attribute(PeerMode::Pid, cred, proc).unwrap() else {
            panic!("not a pid peer");
        };
        assert_eq!(pid, me);
        assert!(start > 0);
        let reused = proc_with(me, "");
        std::fs::write(
            reused.path().join(format!("{me}/stat")),
            format!(
                "{me} (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {} 1 1\n",
                start + 1
            ),
        )
        .unwrap();
        assert_ne!(
            attribute(PeerMode::Pid, cred, reused.path()),
            Ok(PeerKey::Pid(me, start))
        );
    }

    #[test]
    fn when_the_kernel_cannot_say_the_peer_is_the_uid() {
        let proc = proc_with(7, "0::/kubepods/pod1/a\n");
        let gone = Some(Cred {
            pid: Some(8),
            uid: 5,
        });
        let (key, why) = attribute(PeerMode::Cgroup, gone, proc.path()).unwrap_err();
        assert_eq!(key, PeerKey::Uid(5));
        assert!(why.contains("8/cgroup"), "{why}");
        let hidden = Some(Cred {
            pid: Some(0),
            uid: 6,
        });
        for mode in [PeerMode::Cgroup, PeerMode::Pid] {
            let (key, why) = attribute(mode, hidden, proc.path()).unwrap_err();
            assert_eq!(key, PeerKey::Uid(6));
            assert!(why.contains("no pid"), "{why}");
        }
        let empty = proc_with(9, "");
        let cred = Some(Cred {
            pid: Some(9),
            uid: 1,
        });
        assert_eq!(
            attribute(PeerMode::Cgroup, cred, empty.path())
                .unwrap_err()
                .0,
            PeerKey::Uid(1)
        );
        assert_eq!(
            attribute(PeerMode::Cgroup, None, proc.path())
                .unwrap_err()
                .0,
            PeerKey::Unknown
        );
    }
}

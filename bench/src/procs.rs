//! Processes the harness runs (node-agent, bao agent) and what /proc says about
//! them: resident set, its high-water mark, CPU time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Resident set and its peak, KiB, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn rss(pid: u32) -> Rss {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Rss {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

/// User + system CPU time of a live process.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let f: Vec<u64> = stat[close + 2..]
        .split(' ')
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 2 {
        return Duration::ZERO;
    }
    // USER_HZ is 100 on Linux.
    Duration::from_millis((f[0] + f[1]) * 10)
}

/// CPU time of every child process the harness has waited for so far.
pub fn children_cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// RSS once it has stopped moving (two samples 250 ms apart within 1%), at
/// most `max` after `min` has passed. The peak is whatever the kernel kept.
pub async fn settled(pid: u32, min: Duration, max: Duration) -> Rss {
    tokio::time::sleep(min).await;
    let deadline = Instant::now() + max;
    let mut last = rss(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss(pid);
        let close = now.rss_kib.abs_diff(last.rss_kib) * 100 <= now.rss_kib.max(1);
        if close || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// A node-agent process on a socket in its own directory; killed on drop.
pub struct AgentProc {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// When the process was spawned.
    pub spawned: Instant,
}

/// The harness opens every connection from its own process, where a node
/// has one pod per workload: the per-peer shares are lifted so that the
/// node-wide bounds (sized per run) are what the figures meet.
const ONE_PROCESS_MANY_PODS: [(&str, &str); 6] = [
    ("SDS_PEER_MAX_CONNECTIONS", "1048576"),
    ("SDS_PEER_MAX_STREAMS", "1048576"),
    ("SDS_PEER_MAX_LOGINS_IN_FLIGHT", "1048576"),
    ("SDS_PEER_NEW_JWT_BURST", "1048576"),
    ("SDS_PEER_NEW_JWT_INTERVAL", "0"),
    ("SDS_PEER_MAX_IDENTITIES", "1048576"),
];

impl AgentProc {
    /// Spawns `bin` with only `env` (plus the socket path) and returns at once.
    pub fn spawn(
        bin: &Path,
        dir: &Path,
        name: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WORKLOAD_UDS_PATH", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in ONE_PROCESS_MANY_PODS.iter().copied() {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Self {
            child,
            socket,
            log,
            spawned,
        })
    }

    /// Spawns and waits until the socket accepts connections.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let mut agent = Self::spawn(bin, dir, name, env)?;
        agent.wait_ready(Duration::from_secs(30)).await?;
        Ok(agent)
    }

    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("node-agent exited ({st}); log:\n{}", self.log_tail());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node-agent did not listen within {within:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the agent has died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("node-agent exited ({st}); log:\n{}", self.log_tail());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Log lines that say something failed (refusals, errors).
    pub fn error_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .map(String::from)
            .collect()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Starts the real `node-agent` binary for integration tests, on a socket in
//! a temp dir, and captures its log.
//!
//! The waits come in two forms. The `async` ones (`started`, `log_shows`,
//! `exited`) sleep with tokio and are what a test whose runtime also runs
//! servers (TokenReview, proxies, fronts) must use. The blocking ones, on a
//! multi-thread runtime, step aside with `block_in_place`, so that the
//! runtime's other tasks go on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running agent; killed (SIGKILL) on drop unless stopped first.
pub struct Agent {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    /// The status server's `IP:PORT`: a free loopback port unless `env` sets
    /// `STATUS_ADDR` (empty: off).
    pub status_addr: String,
    _dir: Option<tempfile::TempDir>,
}

impl Agent {
    /// Starts the agent with `env` (plus a fresh socket path) and waits for its socket.
    pub fn start(env: &[(&str, String)]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds").join("uds_path");
        let mut agent = Self::start_at(&socket, dir.path(), env);
        agent._dir = Some(dir);
        agent
    }

    /// Starts the agent on `socket`, logging into `log_dir`.
    pub fn start_at(socket: &Path, log_dir: &Path, env: &[(&str, String)]) -> Agent {
        let agent = Self::spawn(socket, log_dir, env);
        agent.wait_log("SDS gRPC server start", Duration::from_secs(30));
        agent
    }

    /// [`Agent::start`] without blocking the runtime.
    pub async fn started(env: &[(&str, String)]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sds").join("uds_path");
        let mut agent = Self::spawn(&socket, dir.path(), env);
        agent._dir = Some(dir);
        agent
            .log_shows("SDS gRPC server start", Duration::from_secs(30))
            .await;
        agent
    }

    /// Spawns without waiting (for tests of start-up failures).
    pub fn spawn(socket: &Path, log_dir: &Path, env: &[(&str, String)]) -> Agent {
        Self::spawn_args(socket, log_dir, env, &[])
    }

    /// Spawns with command-line arguments too.
    pub fn spawn_args(
        socket: &Path,
        log_dir: &Path,
        env: &[(&str, String)],
        args: &[&str],
    ) -> Agent {
        let log_path = log_dir.join(format!("agent-{}.log", rand_suffix()));
        let log = std::fs::File::create(&log_path).unwrap();
        let status_addr = env
            .iter()
            .find(|(k, _)| *k == "STATUS_ADDR")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| format!("127.0.0.1:{}", super::ports::free_port()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_node-agent"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "info")
            .env("WORKLOAD_UDS_PATH", socket)
            .env("STATUS_ADDR", &status_addr)
            .stdout(Stdio::null())
            .stderr(log);
        // Every client of a test runs in the test's process, so it is one
        // peer: its shares are as large as the node-wide bounds, which the
        // tests aim at, unless a test sets them (the peers' own tests do).
        for (k, v) in UNSHARED {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args);
        Agent {
            child: Some(cmd.spawn().expect("start node-agent")),
            socket: socket.to_path_buf(),
            log_path,
            status_addr,
            _dir: None,
        }
    }

    /// The agent's process id (for /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// CPU time (user + system) the agent has used so far, from /proc.
    pub fn cpu_time(&self) -> Duration {
        let pid = self.child.as_ref().unwrap().id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name (which is in parentheses).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        let ticks = 100; // USER_HZ on Linux
        Duration::from_millis((f[0] + f[1]) * 1000 / ticks)
    }

    /// `http://<status_addr><path>`, e.g. `agent.status_url("/metrics")`.
    pub fn status_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.status_addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (or panics with the log).
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "agent log never showed {needle:?}; log:\n{}",
                self.log()
            );
            blocking_sleep(Duration::from_millis(100));
        }
    }

    /// [`Agent::wait_log`] without blocking the runtime.
    pub async fn log_shows(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "agent log never showed {needle:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        unsafe_kill(self.child.as_ref().unwrap().id(), "TERM");
    }

    /// [`Agent::wait_exit`] without blocking the runtime.
    pub async fn exited(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.as_ref().unwrap().id(), "TERM");
        self.wait_exit(Duration::from_secs(15))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit; log:\n{}",
                self.log()
            );
            blocking_sleep(Duration::from_millis(50));
        }
    }
}

/// Per-peer shares no larger than the node-wide bounds: a test process
/// stands for many pods at once.
pub const UNSHARED: [(&str, &str); 6] = [
    ("SDS_PEER_MAX_CONNECTIONS", "1048576"),
    ("SDS_PEER_MAX_STREAMS", "1048576"),
    ("SDS_PEER_MAX_LOGINS_IN_FLIGHT", "1024"),
    ("SDS_PEER_NEW_JWT_BURST", "1048576"),
    ("SDS_PEER_NEW_JWT_INTERVAL", "0"),
    ("SDS_PEER_MAX_IDENTITIES", "1048576"),
];

/// A blocking sleep that, on a multi-thread tokio runtime, first hands this
/// worker's tasks to another thread, so that servers on the runtime go on.
fn blocking_sleep(d: Duration) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| std::thread::sleep(d))
        }
        _ => std::thread::sleep(d),
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

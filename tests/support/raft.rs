//! A real three-node OpenBao cluster with integrated Raft storage, every
//! process on loopback, for high-availability tests.
//!
//! - Each node has its own config: `storage "raft"` with `retry_join` to
//!   every node, its own API and cluster ports, the static-key auto-unseal
//!   (`seal "static"`, one 32-byte key file shared by the nodes), and an audit
//!   device identical on every node, same file included (otherwise a newly
//!   elected leader fails its post-unseal setup and the cluster has no active
//!   node).
//! - Node 0 is initialised (`sys/init` with one recovery share); the others
//!   join and unseal by themselves.
//! - Raft timings are shortened (`performance_multiplier = 1`, autopilot
//!   every second, a 1 s stabilization time) so that the cluster is ready in
//!   about ten seconds and elects a new leader within a few seconds. The
//!   cluster is ready once every node is a voter: kill the leader before that
//!   and no quorum remains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use reqwest::Method;
use serde_json::{json, Value};

use super::bao::Bao;

/// A running cluster; every node is killed on drop.
pub struct RaftCluster {
    /// The nodes, by index (node IDs `n0`, `n1`, ...).
    pub nodes: Vec<Bao>,
    root_token: String,
    _dir: tempfile::TempDir,
}

impl RaftCluster {
    /// Starts `size` nodes, initialises the cluster and waits until every
    /// node is a voter and unsealed.
    pub async fn start(size: usize) -> anyhow::Result<RaftCluster> {
        let dir = tempfile::Builder::new().prefix("bao-raft").tempdir()?;
        let ports: Vec<u16> = (0..size).map(|_| super::ports::free_port_pair()).collect();
        let key = dir.path().join("seal.key");
        std::fs::write(&key, rand::random::<[u8; 32]>())?;
        let audit = dir.path().join("audit.log");
        let bin = std::env::var("BAO_BIN").unwrap_or_else(|_| "bao".into());
        let joins: String = ports
            .iter()
            .map(|p| format!("  retry_join {{ leader_api_addr = \"http://127.0.0.1:{p}\" }}\n"))
            .collect();
        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(node_dir.join("raft"))?;
            let config = format!(
                r#"storage "raft" {{
  path = {raft:?}
  node_id = "n{i}"
  performance_multiplier = 1
  autopilot_reconcile_interval = "1s"
  autopilot_update_interval = "500ms"
{joins}}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable = true
}}
seal "static" {{
  current_key_id = "k1"
  current_key = "file://{key}"
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cluster}"
disable_mlock = true
audit "file" "log" {{
  options {{
    file_path = {audit:?}
  }}
}}
"#,
                raft = node_dir.join("raft").display().to_string(),
                cluster = port + 1,
                key = key.display(),
                audit = audit.display().to_string(),
            );
            let config_path = node_dir.join("bao.hcl");
            std::fs::write(&config_path, config)?;
            let log = std::fs::File::create(node_dir.join("bao.log"))?;
            let child = Command::new(&bin)
                .arg("server")
                .arg(format!("-config={}", config_path.display()))
                .env_remove("BAO_ADDR")
                .env_remove("VAULT_ADDR")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawn `bao server` (Raft node)")?;
            let addr: SocketAddr = ([127, 0, 0, 1], *port).into();
            nodes.push(Bao::node(child, node_dir, addr, audit.clone()));
        }
        let mut cluster = RaftCluster {
            nodes,
            root_token: String::new(),
            _dir: dir,
        };
        cluster
            .init()
            .await
            .map_err(|e| anyhow!("{e:#}\n{}", cluster.logs()))?;
        Ok(cluster)
    }

    async fn init(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Every node listens.
        for i in 0..self.nodes.len() {
            while self.nodes[i]
                .call(Method::GET, "sys/health", None, None)
                .await
                .is_err()
            {
                if !self.nodes[i].is_running() {
                    bail!("node {i} exited");
                }
                check(deadline, "nodes listening")?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (status, init) = self.nodes[0]
            .call(
                Method::POST,
                "sys/init",
                None,
                Some(&json!({ "recovery_shares": 1, "recovery_threshold": 1 })),
            )
            .await?;
        if !status.is_success() {
            bail!("sys/init: {status}: {init}");
        }
        self.root_token = init["root_token"]
            .as_str()
            .ok_or_else(|| anyhow!("no root token in {init}"))?
            .to_string();
        let token = self.root_token.clone();
        for n in &mut self.nodes {
            n.set_root_token(&token);
        }
        // Node 0 becomes active, then takes the short stabilization time.
        loop {
            let r = self.nodes[0]
                .call(
                    Method::POST,
                    "sys/storage/raft/autopilot/configuration",
                    Some(&token),
                    Some(&json!({ "server_stabilization_time": "1s" })),
                )
                .await;
            if matches!(&r, Ok((s, _)) if s.is_success()) {
                break;
            }
            check(deadline, "the first node active")?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.wait_ready(deadline).await
    }

    /// Waits until every node is a Raft voter and every running node is
    /// unsealed (active or standby).
    async fn wait_ready(&self, deadline: Instant) -> anyhow::Result<()> {
        loop {
            let voters = match self
                .root(Method::GET, "sys/storage/raft/configuration", None)
                .await
            {
                Ok(v) => v["data"]["config"]["servers"]
                    .as_array()
                    .map(|s| s.iter().filter(|s| s["voter"] == true).count())
                    .unwrap_or(0),
                Err(_) => 0,
            };
            let mut unsealed = 0;
            for n in &self.nodes {
                if let Ok((_, h)) = n
                    .call(Method::GET, "sys/health?standbyok=true", None, None)
                    .await
                {
                    if h["sealed"] == false && h["initialized"] == true {
                        unsealed += 1;
                    }
                }
            }
            if voters == self.nodes.len() && unsealed == self.nodes.len() {
                return Ok(());
            }
            check(
                deadline,
                &format!(
                    "{voters} voters and {unsealed} unsealed nodes of {}",
                    self.nodes.len()
                ),
            )?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// The index of the active node, as the running nodes see it.
    pub async fn leader(&mut self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                continue;
            }
            if let Ok((_, v)) = self.nodes[i]
                .call(Method::GET, "sys/leader", None, None)
                .await
            {
                if v["is_self"] == true {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Waits for an active node other than `not` (after killing `not`).
    pub async fn wait_new_leader(
        &mut self,
        not: usize,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await.filter(|l| *l != not) {
                return Ok(l);
            }
            check(deadline, "a new leader")?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A node that is not the leader.
    pub async fn standby(&mut self) -> anyhow::Result<usize> {
        let leader = self.leader().await.ok_or_else(|| anyhow!("no leader"))?;
        Ok((leader + 1) % self.nodes.len())
    }

    /// A root-token call to whichever running node answers (standbys forward).
    pub async fn root(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut last = None;
        for n in &self.nodes {
            match n.root(method.clone(), path, body.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no node")))
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {i} ({})\n{}", n.addr(), n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The cluster's shared audit log.
    pub fn audit_log_path(&self) -> PathBuf {
        self.nodes[0].audit_log_path()
    }
}

fn check(deadline: Instant, what: &str) -> anyhow::Result<()> {
    if Instant::now() > deadline {
        bail!("the Raft cluster never got ready: waiting for {what}");
    }
    Ok(())
}

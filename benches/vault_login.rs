//! Vault login throughput with service tokens against batch tokens (the
//! choice behind `vault-setup --token-type`), on a real OpenBao configured by
//! `node-agent vault-setup`: once with dev mode's in-memory storage, once
//! with integrated (Raft) storage on disk as a production server has it.
//! Each login is what node-agent does per distinct workload JWT. Prints
//! figures; asserts nothing.
//!
//! Run: `./test.sh --no-run && PATH=$PWD/.peers/bin:$PATH cargo bench --bench vault_login`
//! (`BENCH_LOGINS`, default 2000, and `BENCH_CONCURRENCY`, default 16).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::cli::{node_agent, write};
use support::k8s::{start_token_review, DEFAULT_AUDIENCE};
use support::vault_env::issuer;

/// An OpenBao server over plain HTTP; killed on drop.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    addr: String,
    token: String,
    raft: bool,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(raft: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = support::ports::free_port_pair();
        let addr = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let mut cmd = Command::new("bao");
        cmd.env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if raft {
            let d = dir.path();
            std::fs::create_dir(d.join("data")).unwrap();
            std::fs::write(d.join("seal.key"), rand::random::<[u8; 32]>()).unwrap();
            let config = format!(
                "storage \"raft\" {{\n  path = \"{data}\"\n  node_id = \"n1\"\n}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\n\
                 api_addr = \"{addr}\"\ncluster_addr = \"http://127.0.0.1:{cluster}\"\n\
                 disable_mlock = true\n\
                 seal \"static\" {{\n  current_key_id = \"k1\"\n  current_key = \"file://{key}\"\n}}\n",
                data = d.join("data").display(),
                cluster = port + 1,
                key = d.join("seal.key").display(),
            );
            std::fs::write(d.join("bao.hcl"), config).unwrap();
            cmd.arg("server")
                .arg(format!("-config={}", d.join("bao.hcl").display()));
        } else {
            cmd.args(["server", "-dev", "-dev-root-token-id=root"])
                .arg(format!("-dev-listen-address=127.0.0.1:{port}"));
        }
        let child = cmd.spawn().expect("start bao");
        let mut server = Server {
            child,
            _dir: dir,
            addr,
            token: "root".into(),
            raft,
        };
        let http = reqwest::Client::new();
        let health = format!("{}/v1/sys/health", server.addr);
        let deadline = Instant::now() + Duration::from_secs(30);
        if raft {
            while http.get(&health).send().await.is_err() {
                assert!(Instant::now() < deadline, "bao did not start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let init: Value = http
                .post(format!("{}/v1/sys/init", server.addr))
                .json(&json!({ "recovery_shares": 1, "recovery_threshold": 1 }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            server.token = init["root_token"].as_str().expect("root token").to_string();
        }
        loop {
            if let Ok(r) = http.get(&health).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "bao did not become active");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    /// Raft's committed log index: one entry per storage write (0 in memory).
    async fn raft_index(&self) -> u64 {
        if !self.raft {
            return 0;
        }
        let v: Value = reqwest::get(format!("{}/v1/sys/leader", self.addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["raft_committed_index"]
            .as_u64()
            .expect("raft_committed_index")
    }
}

struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// Raft log entries (storage writes) per login.
    writes_per_login: f64,
}

/// One login; returns how long it took.
async fn login(http: reqwest::Client, url: Arc<String>, jwt: String) -> Duration {
    let t = Instant::now();
    let r = http
        .post(url.as_str())
        .json(&json!({ "role": "istio-cert", "jwt": jwt }))
        .send()
        .await
        .expect("login request");
    assert_eq!(
        r.status(),
        200,
        "login: {}",
        r.text().await.unwrap_or_default()
    );
    t.elapsed()
}

async fn measure(
    server: &Server,
    login_path: &str,
    jwts: &Arc<Vec<String>>,
    logins: usize,
    conc: usize,
) -> Figures {
    let http = reqwest::Client::new();
    let url = Arc::new(format!("{}/v1/{login_path}", server.addr));
    // Warm-up: each service account's entity exists before the clock starts.
    for jwt in jwts.iter() {
        login(http.clone(), url.clone(), jwt.clone()).await;
    }
    let before = server.raft_index().await;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (next, http, url, jwts) = (next.clone(), http.clone(), url.clone(), jwts.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= logins {
                    return lat;
                }
                let jwt = jwts[i % jwts.len()].clone();
                lat.push(login(http.clone(), url.clone(), jwt).await);
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let wall = start.elapsed();
    lat.sort();
    Figures {
        rate: logins as f64 / wall.as_secs_f64(),
        p50: lat[lat.len() / 2],
        p99: lat[(lat.len() - 1) * 99 / 100],
        writes_per_login: (server.raft_index().await - before) as f64 / logins as f64,
    }
}

#[tokio::main]
async fn main() {
    let num = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (logins, conc) = (num("BENCH_LOGINS", 2000), num("BENCH_CONCURRENCY", 16));
    println!("Vault login throughput, service vs batch tokens: {logins} logins, {conc} in flight, OpenBao on loopback");
    let issuer = issuer();
    let review = start_token_review(&issuer.public_key_pem(), 0)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwts: Arc<Vec<String>> = Arc::new(
        (0..64)
            .map(|i| issuer.mint("default", &format!("bench-{i}"), Duration::from_secs(7200)))
            .collect(),
    );
    let review_url = review.url();
    let reviewer = write(
        dir.path(),
        "reviewer.jwt",
        &issuer.mint("kube-system", "vault-auth", Duration::from_secs(86400)),
    );
    let pubkeys = write(dir.path(), "sa.pub", &issuer.public_key_pem());
    let ca = write(
        dir.path(),
        "k8s-ca.pem",
        &rcgen::generate_simple_self_signed(vec!["k8s".to_string()])
            .unwrap()
            .cert
            .pem(),
    );
    println!(
        "{:<10} {:<11} {:<8} {:>10} {:>9} {:>9} {:>22}",
        "storage", "method", "token", "logins/s", "p50 ms", "p99 ms", "raft writes/login"
    );
    for raft in [false, true] {
        let server = Server::start(raft).await;
        let vars = vec![
            ("VAULT_ADDR", server.addr.clone()),
            ("VAULT_TOKEN", server.token.clone()),
        ];
        for method in ["kubernetes", "jwt"] {
            for token_type in ["service", "batch"] {
                let path = format!("{method}-{token_type}");
                let mut args = vec![
                    "vault-setup",
                    "--auth-method",
                    method,
                    "--auth-path",
                    &path,
                    "--token-type",
                    token_type,
                    "--bound-namespaces",
                    "default",
                    "--bound-service-accounts",
                    "*",
                ];
                if method == "kubernetes" {
                    args.extend([
                        "--kubernetes-host",
                        &review_url,
                        "--kubernetes-ca-cert",
                        &ca,
                        "--token-reviewer-jwt",
                        &reviewer,
                    ]);
                } else {
                    args.extend([
                        "--jwt-validation-pubkeys",
                        &pubkeys,
                        "--audience",
                        DEFAULT_AUDIENCE,
                    ]);
                }
                let out = node_agent(&args, &vars).await;
                assert_eq!(out.code, 0, "{}", out.both());
                let f = measure(&server, &format!("auth/{path}/login"), &jwts, logins, conc).await;
                println!(
                    "{:<10} {:<11} {:<8} {:>10.0} {:>9.2} {:>9.2} {:>22}",
                    if raft { "raft" } else { "in-memory" },
                    method,
                    token_type,
                    f.rate,
                    f.p50.as_secs_f64() * 1e3,
                    f.p99.as_secs_f64() * 1e3,
                    if raft {
                        format!("{:.2}", f.writes_per_login)
                    } else {
                        "-".into()
                    },
                );
            }
        }
        drop(server);
    }
}

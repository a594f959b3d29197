//! How many CA requests in flight (`CA_MAX_CONCURRENCY`) serve a burst of
//! new workloads fastest, against a real OpenBao (TLS, kubernetes auth with a
//! real TokenReview, PKI sign). Each new identity costs one login and one
//! sign. Prints figures; asserts nothing. Run: `./test.sh` installs the
//! peers once, then `PATH=$PWD/.peers/bin:$PATH cargo bench --bench ca_concurrency`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::agent::Agent;
use support::sds_client::*;
use support::vault_env::VaultEnv;

#[tokio::main]
async fn main() {
    let identities: usize = std::env::var("BENCH_IDENTITIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    println!(
        "node-agent CA concurrency benchmark: {identities} new identities at once against OpenBao"
    );
    let env = VaultEnv::start().await;
    support::bao::set_k8s_role_accounts(&env.bao, &["*"], &["default"])
        .await
        .unwrap();
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,4,16,32,64,128".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    for (round, conc) in levels.into_iter().enumerate() {
        let mut vars = env.agent_env();
        vars.push(("CA_MAX_CONCURRENCY", conc.to_string()));
        let agent = Agent::start(&vars);
        let jwts: Vec<String> = (0..identities)
            .map(|i| env.jwt("default", &format!("bench-{round}-{i}")))
            .collect();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for jwt in jwts {
            let socket = agent.socket.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let mut c = connect(&socket).await;
                fetch(&mut c, &["default"], &jwt).await.expect("fetch");
                t.elapsed()
            }));
        }
        let mut lat: Vec<Duration> = Vec::new();
        for t in tasks {
            lat.push(t.await.unwrap());
        }
        let wall = start.elapsed();
        lat.sort();
        println!(
            "CA_MAX_CONCURRENCY={conc:<3} {:>7.1} identities/s   wall {:>6.2} s   p50 {:>7.0} ms   p99 {:>7.0} ms",
            identities as f64 / wall.as_secs_f64(),
            wall.as_secs_f64(),
            lat[lat.len() / 2].as_secs_f64() * 1e3,
            lat[(lat.len() - 1) * 99 / 100].as_secs_f64() * 1e3,
        );
    }
}

//! A real Prometheus (Debian's `prometheus` package, pinned in
//! scripts/system-packages.sh) for the tests: started in a temp dir on a
//! loopback port, scraping given targets every second and evaluating given
//! rule files every second, and asked through its HTTP API.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::support::ports::free_port;

/// A `prometheus` process; killed on drop.
pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
    client: reqwest::Client,
}

/// An alert as `/api/v1/alerts` lists it (pending or firing).
#[derive(Debug, Clone)]
pub struct Alert {
    pub name: String,
    pub state: String,
    pub labels: serde_json::Map<String, Value>,
    /// When its expression first returned it.
    pub active_at: SystemTime,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`IP:PORT`, path `/metrics`) as
    /// job `job`, with `rules` loaded; returns once it is ready.
    pub async fn start(job: &str, targets: &[&str], rules: &Path) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("prometheus")
            .tempdir()
            .unwrap();
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n- '{}'\n\
                 scrape_configs:\n- job_name: '{job}'\n  static_configs:\n  - targets: [{}]\n",
                rules.display(),
                targets.join(", ")
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's package; ./test.sh installs it)");
        let mut p = Prometheus {
            child,
            dir,
            url: format!("http://{addr}"),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            let ready = p.client.get(format!("{}/-/ready", p.url)).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url = format!("{}/api/v1/{path}", self.url);
        let resp = self
            .client
            .get(&url)
            .query(query)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// The series an instant query returns now (`data.result`), with their
    /// labels under `metric`.
    pub async fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", promql)]).await;
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"].as_array().unwrap().clone()
    }

    /// Polls until `promql` returns a series (or panics after 30 s).
    pub async fn has_data(&self, promql: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.query(promql).await.is_empty() {
            assert!(Instant::now() < deadline, "no {promql}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The values of label `name` among the series `matcher` selects.
    pub async fn label_values(&self, name: &str, matcher: &str) -> Vec<String> {
        let data = self
            .api(&format!("label/{name}/values"), &[("match[]", matcher)])
            .await;
        data.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    /// The alerts pending or firing now.
    pub async fn alerts(&self) -> Vec<Alert> {
        let data = self.api("alerts", &[]).await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let at = a["activeAt"].as_str().unwrap();
                let at =
                    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                        .unwrap_or_else(|e| panic!("activeAt {at:?}: {e}"));
                Alert {
                    name: a["labels"]["alertname"].as_str().unwrap().to_string(),
                    state: a["state"].as_str().unwrap().to_string(),
                    labels: a["labels"].as_object().unwrap().clone(),
                    active_at: SystemTime::UNIX_EPOCH
                        + Duration::from_nanos(at.unix_timestamp_nanos() as u64),
                }
            })
            .collect()
    }

    /// Polls the alerts until `done` holds for them (returning them), or
    /// panics after `within` saying `what`.
    pub async fn alerts_when(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[Alert]) -> bool,
    ) -> Vec<Alert> {
        let deadline = Instant::now() + within;
        loop {
            let alerts = self.alerts().await;
            if done(&alerts) {
                return alerts;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; alerts now: {alerts:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

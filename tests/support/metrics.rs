//! Scrapes an agent's `/metrics` and parses it with the reference parsers of
//! the Prometheus Python client (PyPI `prometheus-client`, pinned in
//! peers.txt): the Prometheus text format 0.0.4 or OpenMetrics 1.0, both
//! strict. A malformed exposition fails the parse, not a string match.

use std::collections::BTreeMap;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// One sample: its name (with `_total`, `_bucket`... suffixes), labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Family name → type (`counter`, `gauge`, `histogram`, `info`...).
    pub families: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`; panics
    /// when several match (ask more precisely).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        assert!(
            found.len() <= 1,
            "{name}{labels:?} matches {} samples: {found:?}",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    /// Like [`Scrape::value`], panicking with the exposition when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

const PARSER: &str = r#"
import json, sys
fmt = sys.argv[1]
text = sys.stdin.read()
if fmt == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = {"families": {}, "samples": []}
for fam in text_string_to_metric_families(text):
    out["families"][fam.name] = fam.type
    for s in fam.samples:
        out["samples"].append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Parses `text` as `format` (`prometheus` or `openmetrics`); panics with
/// the parser's message when it is malformed.
pub async fn parse(text: &str, format: &str) -> Scrape {
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(PARSER)
        .arg(format)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (the peers virtualenv: ./test.sh puts it on PATH)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let families = v["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), t.as_str().unwrap().to_string()))
        .collect();
    let samples = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap().to_string(),
            labels: s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect();
    Scrape {
        families,
        samples,
        text: text.to_string(),
    }
}

/// GETs `url` asking for OpenMetrics (`openmetrics`) or the classic text
/// format (`prometheus`), checks the content type, and parses the answer.
pub async fn scrape(url: &str, format: &str) -> Scrape {
    let accept = match format {
        "openmetrics" => {
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        }
        _ => "text/plain;version=0.0.4",
    };
    let resp = reqwest::Client::new()
        .get(url)
        .header("accept", accept)
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status(), 200, "GET {url}");
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    let expected = match format {
        "openmetrics" => "application/openmetrics-text",
        _ => "text/plain; version=0.0.4",
    };
    assert!(ctype.starts_with(expected), "content-type {ctype}");
    parse(&resp.text().await.unwrap(), format).await
}

/// The value of an unlabelled sample `name` of the agent's `/metrics` at
/// `url`, read straight from the text exposition (no parser to start, so it
/// can be polled often).
pub async fn gauge(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET /metrics")
        .text()
        .await
        .expect("read /metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

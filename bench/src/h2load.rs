//! Cached serving, driven by `h2load` (Debian `nghttp2-client`) over the
//! agent's Unix socket: a C load generator on one thread, so the agent, not
//! the generator, is what is measured. Latency percentiles come from h2load's
//! per-request log; the CPU each side used is reported next to them. The
//! same runs are made against node-agent and against the floor
//! (`floor_server`), with the same arguments.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::procs;
use crate::storm::percentile;

pub const FETCH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";
pub const STREAM: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
pub const DELTA: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// One h2load run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Serving {
    /// `FetchSecrets`, or `StreamSecrets` or `DeltaSecrets` (each request a
    /// new stream, answered with its first response, then closed by the
    /// client's end of stream).
    pub method: String,
    /// Streams in flight: connections × streams per connection.
    pub concurrency: usize,
    pub connections: usize,
    pub streams_per_connection: usize,
    /// gRPC request body size (Envoy's requests carry its node).
    pub request_bytes: u64,
    pub duration_s: f64,
    pub requests: u64,
    pub req_per_s: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Bytes received per response outside header blocks: its DATA frames
    /// (the gRPC message, a certificate answer of a few KiB, with their
    /// frame headers) and its share of the other frames; an error (trailers
    /// only) would be a few dozen. h2load's `data` counter also counts the
    /// warm-up, its `total` and `headers` do not, so they are what is used.
    pub bytes_per_response: f64,
    /// CPU the server used from the end of h2load's warm-up to its exit,
    /// seconds, and that over the requests h2load counted (which leave the
    /// warm-up out too), µs.
    pub server_cpu_s: f64,
    pub server_cpu_us_per_request: f64,
    /// CPU h2load used, warm-up included, seconds.
    pub generator_cpu_s: f64,
}

pub fn version() -> anyhow::Result<String> {
    let out = Command::new("h2load")
        .arg("--version")
        .output()
        .context("run h2load (Debian package nghttp2-client: apt-get install -y nghttp2-client)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes a gRPC request body (the 5-byte prefix and `req`) to `path`.
pub fn write_body(path: &Path, req: impl Message) -> anyhow::Result<()> {
    let msg = req.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    std::fs::write(path, body)?;
    Ok(())
}

/// The message in a gRPC request body written by [`write_body`].
pub fn read_message(body: &Path) -> anyhow::Result<prost::bytes::Bytes> {
    let bytes = std::fs::read(body).with_context(|| format!("read {}", body.display()))?;
    match bytes.get(5..) {
        Some(msg) if bytes[1..5] == (msg.len() as u32).to_be_bytes() => Ok(msg.to_vec().into()),
        _ => bail!("{} is not one gRPC message", body.display()),
    }
}

/// A server measured: its name (for the files of the run), socket and pid.
pub struct Server<'a> {
    pub name: &'a str,
    pub socket: &'a Path,
    pub pid: u32,
}

pub struct Run<'a> {
    pub jwt: &'a str,
    pub work: &'a Path,
    pub duration: Duration,
    pub warm_up: Duration,
}

impl Run<'_> {
    pub async fn run(
        &self,
        server: &Server<'_>,
        path: &str,
        body: &Path,
        connections: usize,
        streams: usize,
    ) -> anyhow::Result<Serving> {
        let method = path.rsplit('/').next().unwrap_or(path).to_string();
        let name = format!("h2load-{}-{method}-{connections}x{streams}", server.name);
        let log: PathBuf = self.work.join(format!("{name}.tsv"));
        let _ = std::fs::remove_file(&log);
        let jwt = base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.jwt);
        let mut cmd = tokio::process::Command::new("h2load");
        cmd.arg(format!("--base-uri=unix:{}", server.socket.display()))
            .args(["-t", "1"])
            .args(["-c", &connections.to_string()])
            .args(["-m", &streams.to_string()])
            .args(["-D", &format!("{}ms", self.duration.as_millis())])
            .args(["--warm-up-time", &format!("{}ms", self.warm_up.as_millis())])
            .arg(format!("--log-file={}", log.display()))
            .arg("-d")
            .arg(body)
            .args(["-H", "content-type: application/grpc"])
            .args(["-H", "te: trailers"])
            .args([
                "-H",
                &format!("{}: {jwt}", node_agent::client::sds::CREDENTIAL_HEADER),
            ])
            .arg(format!("http://localhost{path}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let cpu0 = procs::children_cpu_time();
        let child = cmd.spawn().context("run h2load")?;
        // The server's CPU is read from the end of the warm-up, as h2load
        // counts requests from then.
        tokio::time::sleep(self.warm_up).await;
        let server0 = procs::cpu_time(server.pid);
        let out = child.wait_with_output().await?;
        let server_cpu = procs::cpu_time(server.pid).saturating_sub(server0);
        let gen_cpu = procs::children_cpu_time().saturating_sub(cpu0);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        std::fs::write(self.work.join(format!("{name}.out")), &text)?;
        if !out.status.success() {
            bail!(
                "h2load failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let parsed = Summary::parse(&text).with_context(|| format!("h2load output:\n{text}"))?;
        if parsed.failed > 0 || parsed.errored > 0 || parsed.done == 0 {
            bail!("h2load saw failed or errored requests:\n{text}");
        }
        let bytes_per_response =
            parsed.total_bytes.saturating_sub(parsed.header_bytes) as f64 / parsed.done as f64;
        if bytes_per_response < 500.0 {
            bail!(
                "responses carry {bytes_per_response:.0} bytes each: not certificates (gRPC errors?):\n{text}"
            );
        }
        let mut lat: Vec<u64> = std::fs::read_to_string(&log)?
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
            .collect();
        lat.sort_unstable();
        let mean = lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64;
        Ok(Serving {
            method,
            concurrency: connections * streams,
            connections,
            streams_per_connection: streams,
            request_bytes: std::fs::metadata(body)?.len(),
            // h2load's "finished in" includes the warm-up; its req/s does not.
            duration_s: self.duration.as_secs_f64(),
            requests: parsed.done,
            req_per_s: parsed.req_per_s,
            mean_us: mean,
            p50_us: percentile(&lat, 0.50) as f64,
            p99_us: percentile(&lat, 0.99) as f64,
            p999_us: percentile(&lat, 0.999) as f64,
            bytes_per_response,
            server_cpu_s: server_cpu.as_secs_f64(),
            server_cpu_us_per_request: server_cpu.as_secs_f64() * 1e6 / parsed.done as f64,
            generator_cpu_s: gen_cpu.as_secs_f64(),
        })
    }
}

#[derive(Debug, Default)]
struct Summary {
    req_per_s: f64,
    done: u64,
    failed: u64,
    errored: u64,
    total_bytes: u64,
    header_bytes: u64,
}

impl Summary {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut s = Summary::default();
        let num = |w: &str| -> f64 {
            w.trim_matches(|c: char| !c.is_ascii_digit() && c != '.')
                .parse()
                .unwrap_or(f64::NAN)
        };
        let mut seen = (false, false, false);
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with("finished in") && words.len() >= 4 {
                // finished in 5.00s, 12345.60 req/s, 40.12MB/s
                s.req_per_s = num(words[3]);
                seen.0 = true;
            } else if line.starts_with("requests:") {
                // requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
                for pair in words[1..].chunks(2) {
                    if let [n, what] = pair {
                        let n = num(n) as u64;
                        match what.trim_end_matches(',') {
                            "done" => s.done = n,
                            "failed" => s.failed = n,
                            "errored" => s.errored = n,
                            _ => {}
                        }
                    }
                }
                seen.1 = true;
            } else if line.starts_with("traffic:") {
                // traffic: 24.57MB (25763245) total, 1.29MB (1349213) headers (space savings x%), 23.25MB (24375000) data
                let count = |what: &str| -> Option<u64> {
                    let end = line.find(&format!(") {what}"))?;
                    let open = line[..end].rfind('(')?;
                    line[open + 1..end].parse().ok()
                };
                if let (Some(total), Some(headers)) = (count("total"), count("headers")) {
                    (s.total_bytes, s.header_bytes) = (total, headers);
                    seen.2 = true;
                }
            }
        }
        if seen != (true, true, true) || !s.req_per_s.is_finite() {
            bail!("unexpected h2load output");
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_summary() {
        let text = "finished in 5.00s, 12345.60 req/s, 40.12MB/s\n\
            requests: 61728 total, 61729 started, 61728 done, 61728 succeeded, 0 failed, 0 errored, 0 timeout\n\
            status codes: 61728 2xx, 0 3xx, 0 4xx, 0 5xx\n\
            traffic: 24.57MB (25763245) total, 1.29MB (1349213) headers (space savings 94.14%), 23.25MB (24375000) data\n";
        let s = Summary::parse(text).unwrap();
        assert_eq!(
            (s.done, s.failed, s.total_bytes, s.header_bytes),
            (61728, 0, 25763245, 1349213)
        );
        assert!((s.req_per_s - 12345.6).abs() < 1e-9);
        assert!(Summary::parse("nothing").is_err());
    }
}

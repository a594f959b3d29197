//! Runs the `node-agent` subcommands (`vault-setup`, `fetch`) as an operator
//! would: the real binary, a clean environment, stdout and stderr captured.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::bao::Bao;

/// What a finished subcommand left.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Both streams, for assertion messages.
    pub fn both(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn command(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_node-agent"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `node-agent ARGS` with only `env` (and PATH) set; at most 60 s.
pub async fn node_agent(args: &[&str], env: &[(&str, String)]) -> Output {
    let child = command(args, env).spawn().expect("start node-agent");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("node-agent {args:?} did not finish within 60 s"))
        .expect("wait for node-agent");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The standard Vault variables for `bao` with its root token.
pub fn vault_vars(bao: &Bao) -> Vec<(&'static str, String)> {
    vec![
        ("VAULT_ADDR", bao.addr()),
        ("VAULT_TOKEN", bao.root_token().to_string()),
        ("VAULT_CACERT", bao.ca_pem_path().display().to_string()),
    ]
}

/// The `KEY=value` lines of `vault-setup`'s stdout.
pub fn settings(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=value: {l:?}"));
            (k.to_string(), v.trim_matches('\'').to_string())
        })
        .collect()
}

/// The item lines of `vault-setup`'s report: (outcome, item).
pub fn items(stderr: &str) -> Vec<(String, String)> {
    const OUTCOMES: [&str; 5] = [
        "created",
        "would create",
        "updated",
        "would update",
        "unchanged",
    ];
    stderr
        .lines()
        .filter_map(|l| {
            let outcome = OUTCOMES
                .iter()
                .find(|o| l.starts_with(*o) && l[o.len()..].starts_with(char::is_whitespace))?;
            Some((outcome.to_string(), l[outcome.len()..].trim().to_string()))
        })
        .collect()
}

/// A running `node-agent fetch --watch`, read line by line.
pub struct Watch {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Watch {
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Watch {
        let mut child = command(args, env).spawn().expect("start node-agent fetch");
        let stdout = child.stdout.take().expect("piped stdout");
        Watch {
            child,
            lines: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        }
    }

    /// Reads lines until one satisfies `pred` (returned), or panics after `within`.
    pub async fn until(&mut self, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "fetch --watch printed no matching line within {within:?}; it printed:\n{}",
                        self.seen.join("\n")
                    )
                })
                .expect("read fetch's stdout")
                .unwrap_or_else(|| {
                    panic!("fetch --watch ended; it printed:\n{}", self.seen.join("\n"))
                });
            self.seen.push(line.clone());
            if pred(&line) {
                return line;
            }
        }
    }

    /// Interrupts it (Ctrl-C) and returns its exit code.
    pub async fn interrupt(mut self) -> i32 {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("fetch --watch stops on SIGINT")
            .expect("wait")
            .code()
            .unwrap_or(-1)
    }
}

/// Writes `text` to `dir/name` and returns the path as a string.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

//! `node-agent fetch` failing as an operator meets it: no socket, a socket
//! nobody listens on or that is not ours to use, no or a refused token,
//! unusable flags. Each is one line on stderr naming the cause, with a
//! non-zero exit (2 for unusable arguments).

use crate::support;

use support::agent::Agent;
use support::cli::{node_agent, write, Output};
use support::sds_client::fake_jwt;

use super::{one_line_error, run_fetch};

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// `node-agent fetch ARGS` as an unprivileged user (root ignores file modes).
async fn fetch_unprivileged(args: &[&str]) -> Output {
    if !running_as_root() {
        return node_agent(args, &[]).await;
    }
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_node-agent"))
        .args(args)
        .env_clear()
        .output()
        .await
        .expect("setpriv (util-linux) runs node-agent as nobody");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_one_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = Agent::start(&[("CA_PROVIDER", "LocalCA".into())]);
    let socket = agent.socket.display().to_string();
    let good = write(d, "good.jwt", &fake_jwt("default", "httpbin"));
    // Positive control: with a token and the socket (here from
    // WORKLOAD_UDS_PATH, as the agent reads it) it works.
    let ok = node_agent(
        &["fetch", "--token", &good, "-o", "pem"],
        &[("WORKLOAD_UDS_PATH", socket.clone())],
    )
    .await;
    assert_eq!(ok.code, 0, "{}", ok.both());
    assert!(
        ok.stdout.starts_with("-----BEGIN CERTIFICATE-----"),
        "{}",
        ok.both()
    );

    let cases: Vec<(&str, Output, &str)> = vec![
        (
            "no socket",
            run_fetch(&d.join("absent.sock").display().to_string(), &good, &[]).await,
            "no agent socket at",
        ),
        (
            "a dead agent's socket",
            {
                let path = d.join("stale.sock");
                drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
                run_fetch(&path.display().to_string(), &good, &[]).await
            },
            "nothing is listening on",
        ),
        (
            "no token",
            node_agent(&["fetch", "--workload-uds-path", &socket], &[]).await,
            "unauthenticated: no credential",
        ),
        (
            "not a JWT",
            run_fetch(&socket, &write(d, "bad.jwt", "not-a-jwt"), &[]).await,
            "unauthenticated: invalid credential",
        ),
        (
            "permission denied on the socket",
            {
                // A socket in a 0700 directory of another user.
                use std::os::unix::fs::PermissionsExt;
                let locked = d.join("locked");
                std::fs::create_dir(&locked).unwrap();
                let path = locked.join("sock");
                let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
                std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
                fetch_unprivileged(&["fetch", "--workload-uds-path", &path.display().to_string()])
                    .await
            },
            "permission denied connecting to",
        ),
        (
            "not an SDS server",
            {
                let path = d.join("http.sock");
                let l = tokio::net::UnixListener::bind(&path).unwrap();
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while let Ok((mut c, _)) = l.accept().await {
                        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                    }
                });
                run_fetch(&path.display().to_string(), &good, &[]).await
            },
            "does not answer as an SDS server",
        ),
        (
            "a server that never answers",
            {
                let path = d.join("silent.sock");
                let l = tokio::net::UnixListener::bind(&path).unwrap();
                tokio::spawn(async move {
                    let mut held = Vec::new();
                    while let Ok((c, _)) = l.accept().await {
                        held.push(c);
                    }
                });
                run_fetch(&path.display().to_string(), &good, &["--timeout", "1s"]).await
            },
            "no answer from the agent at",
        ),
    ];
    for (what, out, expected) in &cases {
        assert_eq!(out.code, 1, "{what}: {}", out.both());
        let line = one_line_error(out);
        assert!(
            line.starts_with("node-agent fetch: error: ") && line.contains(expected),
            "{what}: expected {expected:?} in {line:?}"
        );
        assert!(out.stdout.is_empty(), "{what}: {}", out.both());
    }
    assert!(
        cases[2].1.stderr.contains("--token FILE"),
        "the unauthenticated message says what to do: {}",
        cases[2].1.stderr
    );

    // Unusable arguments: exit 2.
    for args in [
        vec![
            "fetch",
            "--workload-uds-path",
            &socket,
            "--token",
            "/nonexistent/token",
        ],
        vec![
            "fetch",
            "--workload-uds-path",
            &socket,
            "--token",
            &good,
            "--include-key",
        ],
        vec![
            "fetch",
            "--workload-uds-path",
            &socket,
            "--resource",
            "other",
        ],
    ] {
        let out = node_agent(&args, &[]).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.both());
        assert!(out.stdout.is_empty());
    }
}

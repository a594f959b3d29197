//! The container image: built FROM scratch with podman, it runs as its
//! non-root user, read-only and without capabilities, and serves.

use crate::support;

use std::process::Command;
use std::time::Duration;

use support::envoy::free_port;
use support::manifests::*;
use support::sds_client::*;

/// scripts/image.sh builds the image (with this test build's binary) and
/// runs `node-agent --version` in it; then the image serves SDS and its
/// status endpoints as the manifests run it: its own non-root user, a
/// read-only root filesystem, no capabilities.
#[tokio::test]
async fn the_container_image_builds_and_serves() {
    let tag = format!(
        "localhost/node-agent:test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let script = repo().join("scripts/image.sh");
    let out = run(Command::new(&script).args([
        "--binary",
        env!("CARGO_BIN_EXE_node-agent"),
        "--tag",
        &tag,
        "--smoke",
    ]));
    assert!(
        out.contains(&format!("node-agent {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    let _cleanup = RemoveImage(tag.clone());
    let inspect = run(Command::new("podman").args([
        "image",
        "inspect",
        &tag,
        "--format",
        "{{.Config.User}} {{json .Config.Entrypoint}}",
    ]));
    assert_eq!(
        inspect.trim(),
        r#"65532:65532 ["/usr/local/bin/node-agent"]"#
    );

    let dir = tempfile::tempdir().unwrap();
    let sds_dir = dir.path().join("sds");
    std::fs::create_dir(&sds_dir).unwrap();
    // As the DaemonSet's init container leaves it: the image's user owns the
    // directory, mode 0755, which node-agent accepts (it refuses one that
    // others can write). Rootless podman maps that user to a subordinate uid.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(&sds_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    if std::fs::metadata(&sds_dir).unwrap().uid() == 0 {
        std::os::unix::fs::chown(&sds_dir, Some(65532), Some(65532)).unwrap();
    } else {
        run(Command::new("podman")
            .args(["unshare", "chown", "65532:65532"])
            .arg(&sds_dir));
    }
    let status = format!("127.0.0.1:{}", free_port());
    let name = tag.replace([':', '/'], "-");
    let flags = run(Command::new(&script).arg("--print-run-flags"));
    run(Command::new("podman")
        .args(["run", "--detach", "--name", &name])
        .args(flags.split_whitespace())
        .args(["--network", "host", "--read-only", "--cap-drop", "ALL"])
        .arg("--volume")
        .arg(format!("{}:/var/run/sds", sds_dir.display()))
        .args(["--env", "CA_PROVIDER=LocalCA", "--env"])
        .arg(format!("STATUS_ADDR={status}"))
        .arg(&tag));
    let _stop = RemoveContainer(name.clone());

    let ready = format!("http://{status}/healthz/ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(&ready).await {
            if r.status() == 200 {
                break;
            }
        }
        let logs = || run(Command::new("podman").args(["logs", &name]));
        assert!(
            std::time::Instant::now() < deadline,
            "not ready:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let socket = sds_dir.join("uds_path");
    let mut client = connect(&socket).await;
    let resp = fetch(&mut client, &["default"], &fake_jwt("default", "httpbin"))
        .await
        .expect("served from inside the container");
    assert_eq!(
        served_uris(&resp),
        ["spiffe://cluster.local/ns/default/sa/httpbin"]
    );
    // The process as the kernel sees it: the image's user, no capabilities.
    let pid = run(Command::new("podman").args(["inspect", "--format", "{{.State.Pid}}", &name]));
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in\n{status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["65532"; 4], "{status}");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
    assert_eq!(field("CapPrm:"), ["0000000000000000"], "{status}");
}

struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rmi", "--force", &self.0])
            .output();
    }
}

struct RemoveContainer(String);

impl Drop for RemoveContainer {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--time", "1", &self.0])
            .output();
    }
}

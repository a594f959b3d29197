//! What an operator deploys, checked offline and against the real thing:
//!
//! - every kustomization under deploy/ renders (`kubectl kustomize`) and each
//!   object validates strictly against the Kubernetes 1.37 schemas
//!   (PyPI `kubernetes-validate`), with the security settings both layouts
//!   promise;
//! - every variable the manifests give node-agent is a setting it reads (the
//!   list comes from running node-agent's own settings parser, not a copy),
//!   and the values parse;
//! - the Envoy bootstrap the manifests mount runs on two real Envoys doing
//!   mTLS with certificates node-agent got from a real OpenBao, with the
//!   manifests' settings and token audience;
//! - the container image builds FROM scratch with podman and runs, as its
//!   non-root user, read-only and without capabilities.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::agent::Agent;
use support::envoy::{free_port, start_backend, validate_config, EnvoyProc};
use support::manifests::*;
use support::sds_client::*;
use support::vault_env::VaultEnv;

/// The layouts README documents; each must be among the rendered overlays.
const LAYOUTS: &[&str] = &["sidecar", "daemonset", "daemonset/workloads"];

#[test]
fn every_overlay_renders_and_validates_strictly() {
    let found = overlays();
    for layout in LAYOUTS {
        assert!(
            found.iter().any(|o| o == layout),
            "no deploy/{layout} in {found:?}"
        );
    }
    for overlay in &found {
        let objs = rendered(overlay);
        assert!(!objs.is_empty(), "deploy/{overlay} renders nothing");
        validate_strictly(&format!("deploy/{overlay}"), &objs);
    }
}

/// Both layouts: read-only root filesystems, no capabilities, no privilege
/// escalation, non-root, requests and limits on every container, and probes
/// on node-agent's status endpoints.
#[test]
fn layouts_are_locked_down_and_probed() {
    for layout in LAYOUTS {
        let objs = rendered(layout);
        let pods = pod_specs(&objs);
        assert!(!pods.is_empty(), "{layout}");
        for (workload, pod) in &pods {
            let pod_non_root = pod["securityContext"]["runAsNonRoot"] == true;
            for key in ["initContainers", "containers"] {
                for c in containers(pod, key) {
                    let what = format!("{layout}: {workload} {}", c["name"]);
                    let sc = &c["securityContext"];
                    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
                    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
                    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
                    assert!(sc["capabilities"]["add"].is_null(), "{what}");
                    let non_root = sc["runAsNonRoot"] == true
                        || (pod_non_root && sc["runAsNonRoot"].is_null());
                    // The one exception, documented in the manifest: the
                    // DaemonSet's init container that opens the hostPath
                    // directory, as root without any capability.
                    let exception = *layout == "daemonset" && c["name"] == "socket-dir";
                    assert!(non_root || exception, "{what} may run as root");
                    for r in ["requests", "limits"] {
                        for k in ["cpu", "memory"] {
                            assert!(c["resources"][r][k].is_string(), "{what}: no {r}.{k}");
                        }
                    }
                }
            }
        }
        for (workload, c) in node_agent_containers(&objs) {
            let port = c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "status")
                .unwrap_or_else(|| panic!("{workload}: no status port"));
            assert_eq!(port["containerPort"], 15020);
            assert_eq!(
                c["readinessProbe"]["httpGet"],
                json!({"path": "/healthz/ready", "port": "status"})
            );
            assert_eq!(
                c["livenessProbe"]["httpGet"],
                json!({"path": "/healthz/live", "port": "status"})
            );
        }
    }
}

#[test]
fn every_variable_the_manifests_set_is_a_node_agent_setting() {
    let mut checked = 0;
    for overlay in overlays() {
        let objs = rendered(&overlay);
        for (workload, c) in node_agent_containers(&objs) {
            let env = container_env(&c, &objs);
            checked += check_settings(&format!("deploy/{overlay} {workload}"), &env);
        }
    }
    assert!(checked >= 20, "only {checked} variables checked");
    // The check can fail: a near miss is not a setting.
    let known = known_settings();
    for typo in ["VAULT_ROLES", "STATUS_PORT", "LOGFORMAT"] {
        assert!(!known.contains(typo), "{typo}");
    }
    for setting in [
        "STATUS_ADDR",
        "LOG_FORMAT",
        "LOG_LEVEL",
        "VAULT_ROLE",
        "WORKLOAD_UDS_PATH",
    ] {
        assert!(known.contains(setting), "{setting} not in {known:?}");
    }
}

/// The sidecar layout's bootstrap, settings and token audience, against a
/// real OpenBao and two real Envoys: `sleep` calls `httpbin` with mTLS.
#[tokio::test]
async fn the_manifests_envoy_bootstrap_does_mtls_with_node_agent() {
    let envoy_file = repo().join("deploy/envoy/envoy.yaml");
    validate_config(&envoy_file)
        .await
        .expect("the file as shipped is a valid Envoy bootstrap");

    let objs = rendered("sidecar");
    let (_, agent_container) = node_agent_containers(&objs)
        .into_iter()
        .find(|(w, _)| w == "Deployment/httpbin")
        .expect("node-agent in httpbin's pod");
    let manifest_env = container_env(&agent_container, &objs);
    let audience = pod_specs(&objs)
        .into_iter()
        .find(|(w, _)| w == "Deployment/httpbin")
        .and_then(|(_, pod)| {
            pod["volumes"].as_array().unwrap().iter().find_map(|v| {
                v["projected"]["sources"][0]["serviceAccountToken"]["audience"]
                    .as_str()
                    .map(String::from)
            })
        })
        .expect("a projected token with an audience");

    let env = VaultEnv::start_opts(|o| o.k8s_audience = Some(audience.clone())).await;
    // The manifest's settings, with this machine's Vault and paths.
    let mut vars: Vec<(&str, String)> = manifest_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let local: Vec<(&str, String)> = vec![
        ("CA_ADDR", env.agent_addr()),
        ("VAULT_ADDR", env.agent_addr()),
        (
            "VAULT_TLS_ROOT_CERT",
            env.bao.ca_pem_path().display().to_string(),
        ),
    ];
    vars.retain(|(k, _)| {
        !local.iter().any(|(l, _)| l == k) && *k != "WORKLOAD_UDS_PATH" && *k != "STATUS_ADDR"
    });
    vars.extend(local);
    let agent = Agent::start(&vars);
    assert_eq!(
        reqwest::get(agent.status_url("/healthz/ready"))
            .await
            .unwrap()
            .status(),
        200
    );

    let dir = tempfile::tempdir().unwrap();
    let backend = free_port();
    let _backend = start_backend(backend, "hello from httpbin").await;
    let (server_in, client_out) = (free_port(), free_port());
    let mut envoys = Vec::new();
    for (sa, inbound, outbound) in [
        ("httpbin", server_in, free_port()),
        ("sleep", free_port(), client_out),
    ] {
        let token = dir.path().join(format!("{sa}-token"));
        let jwt =
            env.issuer
                .mint_for_audiences("default", sa, Duration::from_secs(3600), &[&audience]);
        std::fs::write(&token, jwt).unwrap();
        let config = local_bootstrap(
            &envoy_file,
            &agent.socket,
            &token,
            inbound,
            outbound,
            backend,
            server_in,
        );
        let envoy = EnvoyProc::start(&config).await.unwrap();
        envoys.push(envoy);
    }
    for e in &envoys {
        e.wait_ready(Duration::from_secs(60))
            .await
            .unwrap_or_else(|err| panic!("{err}\nagent log:\n{}", agent.log()));
    }
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{client_out}/get"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("sleep -> httpbin through both Envoys");
    assert_eq!(resp.status(), 200, "{}", envoys[1].log_tail());
    assert_eq!(
        resp.headers()["x-peer-identity"],
        "spiffe://cluster.local/ns/default/sa/sleep",
        "httpbin's Envoy saw sleep's certificate"
    );
    assert_eq!(resp.text().await.unwrap(), "hello from httpbin");
}

/// deploy/envoy/envoy.yaml with this machine's socket, token and ports in
/// place of the pod's; every replacement must find its target, so that a
/// change of the file's shape fails here instead of testing something else.
fn local_bootstrap(
    file: &Path,
    socket: &Path,
    token: &Path,
    inbound: u16,
    outbound: u16,
    app: u16,
    httpbin: u16,
) -> Value {
    let mut v = yaml_docs(&std::fs::read_to_string(file).unwrap())
        .pop()
        .unwrap();
    let mut replaced = BTreeMap::new();
    fn walk(v: &mut Value, from: &str, to: &str, n: &mut usize) {
        match v {
            Value::String(s) if s.contains(from) => {
                *s = s.replace(from, to);
                *n += 1;
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, from, to, n)),
            Value::Object(o) => o.values_mut().for_each(|x| walk(x, from, to, n)),
            _ => {}
        }
    }
    for (from, to) in [
        ("/var/run/sds/uds_path", socket.display().to_string()),
        (
            "/var/run/secrets/tokens/vault-token",
            token.display().to_string(),
        ),
    ] {
        let mut n = 0;
        walk(&mut v, from, &to, &mut n);
        replaced.insert(from, n);
    }
    // Four SDS sources (default and ROOTCA on each side), one token each.
    assert_eq!(replaced["/var/run/sds/uds_path"], 4, "{replaced:?}");
    assert_eq!(
        replaced["/var/run/secrets/tokens/vault-token"], 4,
        "{replaced:?}"
    );

    v["admin"]["address"]["socket_address"]["port_value"] = json!(0);
    let set_addr = |list: &mut Value, name: &str, addr: Value| {
        let item = list
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in the bootstrap"));
        let sa = if item.get("address").is_some() {
            &mut item["address"]["socket_address"]
        } else {
            &mut item["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]
        };
        assert!(sa.is_object(), "{name}");
        *sa = addr;
    };
    let res = &mut v["static_resources"];
    set_addr(
        &mut res["listeners"],
        "inbound_mtls",
        json!({"address": "127.0.0.1", "port_value": inbound}),
    );
    set_addr(
        &mut res["listeners"],
        "outbound",
        json!({"address": "127.0.0.1", "port_value": outbound}),
    );
    set_addr(
        &mut res["clusters"],
        "app",
        json!({"address": "127.0.0.1", "port_value": app}),
    );
    set_addr(
        &mut res["clusters"],
        "httpbin",
        json!({"address": "127.0.0.1", "port_value": httpbin}),
    );
    v
}

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
    // The image's user must be able to create its socket, as on the emptyDir.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sds_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
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

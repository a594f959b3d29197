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

use crate::support;

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

/// The layouts docs/kubernetes.md documents; each must be among the rendered overlays.
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

/// deploy/istio: node-agent's injection template for Istio 1.2x, in the
/// istiod Helm values and istioctl's IstioOperator alike, merged (as Istio's
/// injector merges it) onto each example workload and the ingress gateway as
/// Istio's own templates leave them: the pods validate strictly; node-agent is
/// a native sidecar that serves on the socket istio-proxy's Envoy dials, with
/// the pod's projected token, the mesh's trust domain and known settings; and
/// where Istio would start istio-proxy first (a native sidecar), the merged
/// pod is one the API server refuses instead.
#[test]
fn the_istio_injection_template_puts_node_agent_on_istios_workload_socket() {
    use support::istio_inject::*;
    let installs = install_files();
    let (_, values, mesh) = &installs[0];
    let template = values["sidecarInjectorWebhook"]["templates"][TEMPLATE]
        .as_str()
        .expect("a node-agent template in values.yaml")
        .to_string();
    let trust_domain = mesh["trustDomain"]
        .as_str()
        .expect("meshConfig.trustDomain");
    let excluded = values["global"]["proxy"]["excludeInboundPorts"]
        .as_str()
        .expect("global.proxy.excludeInboundPorts");
    for (file, v, m) in &installs {
        let same = v["sidecarInjectorWebhook"]["templates"][TEMPLATE].as_str();
        assert!(
            same == Some(template.as_str()),
            "{file} carries another template than values.yaml; first difference: {:?}",
            same.unwrap_or_default()
                .lines()
                .zip(template.lines())
                .find(|(a, b)| a != b)
        );
        assert_eq!(m["trustDomain"], trust_domain, "{file}");
        assert_eq!(
            v["global"]["proxy"]["excludeInboundPorts"], excluded,
            "{file}"
        );
    }
    // Istio renders each template with Go's text/template: one without
    // actions comes out as written, so what is merged here is what Istio merges.
    assert!(!template.contains("{{"), "{template}");

    let mut merged = 0;
    for (overlay, istio_template, how) in [
        ("istio", "sidecar", Injected::Sidecar),
        ("istio/gateway", "gateway", Injected::Gateway),
    ] {
        let objs = rendered(overlay);
        let workloads: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "Deployment").collect();
        assert!(!workloads.is_empty(), "deploy/{overlay}");
        for w in workloads {
            let what = format!("deploy/{overlay} {}", name(w));
            let meta = &w["spec"]["template"]["metadata"];
            assert_eq!(
                meta["annotations"]["inject.istio.io/templates"],
                format!("{istio_template},{TEMPLATE}"),
                "{what}: Istio's template first, then node-agent's"
            );
            assert_eq!(meta["labels"]["sidecar.istio.io/inject"], "true", "{what}");
            if how == Injected::Sidecar {
                assert_eq!(
                    meta["annotations"]["sidecar.istio.io/nativeSidecar"], "false",
                    "{what}: istio-proxy must start after node-agent"
                );
            }
            let pod = strategic_merge(&istio_injected_pod(w, how), &template);
            validate_strictly(&what, std::slice::from_ref(&pod));
            check_node_agent_in_istio_pod(&what, &pod, trust_domain, excluded);
            // The app's containers are still there, unchanged.
            for c in containers(&w["spec"]["template"]["spec"], "containers") {
                if c["name"] != "istio-proxy" {
                    assert!(
                        containers(&pod["spec"], "containers").contains(&c),
                        "{what}: {} changed",
                        c["name"]
                    );
                }
            }
            merged += 1;

            // Where istio-proxy is a native sidecar, Istio starts it before
            // node-agent (it orders istio-proxy first): the template then adds
            // a second istio-proxy, which the API server refuses (container
            // names are unique in a pod), rather than a pod on istiod's CA.
            if how == Injected::Sidecar {
                let native =
                    strategic_merge(&istio_injected_pod(w, Injected::NativeSidecar), &template);
                let named = |key: &str| {
                    containers(&native["spec"], key)
                        .iter()
                        .filter(|c| c["name"] == "istio-proxy")
                        .count()
                };
                assert_eq!(
                    (named("initContainers"), named("containers")),
                    (1, 1),
                    "{what} in native mode:\n{native:#}"
                );
            }
        }
    }
    assert_eq!(merged, 3, "httpbin, sleep and the ingress gateway");
}

/// node-agent in an injected pod: a native sidecar on the socket istio-proxy's
/// Envoy dials, with the pod's own projected token, the mesh's trust domain,
/// probes istio-agent's ports and traffic capture leave alone, and only
/// settings node-agent knows.
fn check_node_agent_in_istio_pod(what: &str, pod: &Value, trust_domain: &str, excluded: &str) {
    use support::istio_inject::*;
    let spec = &pod["spec"];
    let agents = node_agent_containers(std::slice::from_ref(pod));
    assert_eq!(agents.len(), 1, "{what}: {spec:#}");
    let (_, agent) = &agents[0];
    assert_eq!(agent["name"], "node-agent");
    assert!(
        containers(spec, "initContainers").contains(agent),
        "{what}: node-agent is an init container"
    );
    assert_eq!(agent["restartPolicy"], "Always", "{what}: a native sidecar");
    let proxies: Vec<Value> = containers(spec, "containers")
        .into_iter()
        .filter(|c| c["name"] == "istio-proxy")
        .collect();
    assert_eq!(proxies.len(), 1, "{what}");

    let env: BTreeMap<String, String> = container_env(agent, &[]);
    check_settings(what, &env);
    let mount_of = |c: &Value, volume: &str| -> Option<String> {
        containers(c, "volumeMounts")
            .iter()
            .find(|m| m["name"] == volume)
            .map(|m| m["mountPath"].as_str().unwrap().to_string())
    };
    let volume = |name: &str| -> Value {
        containers(spec, "volumes")
            .into_iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{what}: no volume {name}"))
    };

    // The socket: where Istio's bootstrap points Envoy (istio-proxy runs in /).
    let socket = &env["WORKLOAD_UDS_PATH"];
    assert_eq!(socket.as_str(), &SDS_PIPE[1..], "{what}");
    let dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    assert_eq!(dir, WORKLOAD_SOCKET_DIR);
    let shared: Vec<String> = containers(agent, "volumeMounts")
        .iter()
        .filter(|m| m["mountPath"] == dir)
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(shared.len(), 1, "{what}: node-agent mounts {dir}");
    assert_eq!(
        mount_of(&proxies[0], &shared[0]).as_deref(),
        Some(dir),
        "{what}: istio-proxy mounts the same volume there"
    );
    assert!(volume(&shared[0])["emptyDir"].is_object(), "{what}");

    // The token: the pod's own, projected with an audience for Vault.
    let token = Path::new(&env["WORKLOAD_TOKEN_PATH"]);
    let token_dir = token.parent().unwrap().to_str().unwrap();
    let token_volume = containers(agent, "volumeMounts")
        .into_iter()
        .find(|m| m["mountPath"] == token_dir)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {token_dir}"));
    let source = &volume(token_volume["name"].as_str().unwrap())["projected"]["sources"][0]
        ["serviceAccountToken"];
    assert_eq!(
        source["path"].as_str(),
        token.file_name().unwrap().to_str(),
        "{what}"
    );
    assert!(
        !source["audience"].as_str().unwrap_or_default().is_empty(),
        "{what}: the token has an audience Vault's role checks"
    );

    assert_eq!(env["TRUST_DOMAIN"], trust_domain, "{what}: the mesh's");

    // Status: not istio-agent's ports, excluded from inbound capture, and the
    // probes kubelet runs there (the startup probe orders istio-proxy after).
    let port: u16 = env["STATUS_ADDR"]
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(![15000, 15001, 15004, 15006, 15020, 15021, 15053, 15090].contains(&port));
    assert!(
        excluded.split(',').any(|p| p.trim() == port.to_string()),
        "{what}: port {port} not in excludeInboundPorts {excluded:?}"
    );
    for (probe, path) in [
        ("startupProbe", "/healthz/ready"),
        ("readinessProbe", "/healthz/ready"),
        ("livenessProbe", "/healthz/live"),
    ] {
        assert_eq!(
            agent[probe]["httpGet"],
            json!({"path": path, "port": port}),
            "{what}: {probe}"
        );
    }
    // Istio's proxy uid: traffic capture lets its connections to Vault out.
    let sc = &agent["securityContext"];
    assert_eq!(sc["runAsUser"], 1337, "{what}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
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

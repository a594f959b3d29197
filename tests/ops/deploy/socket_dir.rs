//! The DaemonSet's socket directory and how workloads reach it, offline: the
//! directory is node-agent's alone (its uid, 0755; the init container that
//! makes it so is run here with only its capabilities), never writable by
//! others; daemonset/workloads mount it through the SPIFFE CSI driver with no
//! hostPath, daemonset-hostpath/workloads as the node's directory; and
//! `SOCKET_DIR_CHECK=pod` is set only where the directory is a pod's own
//! emptyDir.

use crate::support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use serde_json::{json, Value};
use support::manifests::*;

/// The node's directory that holds the DaemonSet's socket.
const NODE_DIR: &str = "/var/run/node-agent";
const CSI_DRIVER: &str = "csi.spiffe.io";

/// The volume types Pod Security "restricted" allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

fn pod<'a>(objs: &'a [Value], workload: &str) -> &'a Value {
    pod_specs(objs)
        .into_iter()
        .find(|(w, _)| w == workload)
        .unwrap_or_else(|| panic!("no {workload}"))
        .1
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The mount of `c` at `path`, and the pod volume behind it.
fn mounted_at<'a>(pod: &'a Value, c: &Value, path: &str) -> (Value, &'a Value) {
    let mount = containers(c, "volumeMounts")
        .into_iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("{} mounts nothing at {path}", c["name"]));
    let v = volume(pod, mount["name"].as_str().unwrap());
    (mount, v)
}

/// The directory of node-agent's socket in container `c`.
fn socket_dir(c: &Value, objs: &[Value]) -> String {
    let env = container_env(c, objs);
    let socket = env
        .get("WORKLOAD_UDS_PATH")
        .map(String::as_str)
        .unwrap_or(node_agent::config::DEFAULT_UDS_PATH);
    let dir = std::path::Path::new(socket).parent().unwrap();
    dir.to_str().unwrap().to_string()
}

fn container(pod: &Value, key: &str, name: &str) -> Value {
    containers(pod, key)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {key} {name}"))
}

/// Nothing in either DaemonSet layout makes a directory others can write:
/// no such mode in the text, and every `chmod` leaves group and others
/// without write. The init container gives the socket directory to
/// node-agent's uid and gid, mode 0755; node-agent checks it strictly.
#[test]
fn the_daemonset_socket_directory_is_node_agents_alone() {
    for layout in ["daemonset", "daemonset-hostpath"] {
        let text = kustomize(layout);
        for open in ["1777", "0777", "o+w", "a+w"] {
            assert!(!text.contains(open), "{layout} holds {open:?}");
        }
        let objs = yaml_docs(&text);
        let pod = pod(&objs, "DaemonSet/node-agent");
        let agent = container(pod, "containers", "node-agent");
        let dir = socket_dir(&agent, &objs);
        let (_, socket_volume) = mounted_at(pod, &agent, &dir);
        assert_eq!(socket_volume["hostPath"]["path"], NODE_DIR, "{layout}");
        let env = container_env(&agent, &objs);
        assert!(!env.contains_key("SOCKET_DIR_CHECK"), "{layout}: {env:?}");

        for (_, p) in pod_specs(&objs) {
            for key in ["initContainers", "containers"] {
                for c in containers(p, key) {
                    let words: Vec<String> = ["command", "args"]
                        .iter()
                        .flat_map(|k| containers(&c, k))
                        .filter_map(|w| w.as_str().map(String::from))
                        .flat_map(|w| w.split_whitespace().map(String::from).collect::<Vec<_>>())
                        .collect();
                    for pair in words.windows(2).filter(|p| p[0] == "chmod") {
                        let mode = u32::from_str_radix(&pair[1], 8)
                            .unwrap_or_else(|_| panic!("{layout}: chmod {}", pair[1]));
                        assert_eq!(mode & 0o022, 0, "{layout}: chmod {}", pair[1]);
                    }
                }
            }
        }

        let init = container(pod, "initContainers", "socket-dir");
        let (_, init_volume) = mounted_at(pod, &init, &dir);
        assert_eq!(init_volume, socket_volume, "{layout}");
        let uid = agent["securityContext"]["runAsUser"]
            .as_u64()
            .or(pod["securityContext"]["runAsUser"].as_u64())
            .expect("node-agent's uid");
        let gid = pod["securityContext"]["runAsGroup"].as_u64().unwrap();
        let command: Vec<&str> = init["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        assert_eq!(command[..2], ["sh", "-c"], "{layout}");
        let script = command[2];
        assert!(
            script.ends_with(&format!("chown {uid}:{gid} {dir}")),
            "{script}"
        );
        assert!(script.contains(&format!("chmod 0755 {dir}")), "{script}");
        run_with_its_capabilities(&init, script, &dir, (uid as u32, gid as u32));
    }
}

/// Runs the init container's `script` on a directory of this machine in
/// place of `dir`, as root with only the capabilities the container adds
/// (this machine's sh, chown and chmod stand in for busybox's), from each
/// state kubelet or an earlier start leaves: the directory ends up owned by
/// `owner`, mode 0755. Needs root and setpriv; skipped without them.
fn run_with_its_capabilities(init: &Value, script: &str, dir: &str, owner: (u32, u32)) {
    let tmp = tempfile::tempdir().unwrap();
    if std::fs::metadata(tmp.path()).unwrap().uid() != 0
        || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("not root or no setpriv: the socket-dir init container is not run");
        return;
    }
    let caps: Vec<String> = init["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("+{}", c.as_str().unwrap().to_lowercase()))
        .collect();
    let bounding = format!("-all,{}", caps.join(","));
    for (start_owner, start_mode) in [
        ((0, 0), 0o755),  // kubelet's DirectoryOrCreate
        ((0, 0), 0o1777), // an older manifest's
        (owner, 0o755),   // an earlier start's
        (owner, 0o777),
    ] {
        let d = tmp
            .path()
            .join(format!("sds-{}-{start_mode:o}", start_owner.0));
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(start_owner.0), Some(start_owner.1)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(start_mode)).unwrap();
        let local = script.replace(dir, d.to_str().unwrap());
        let out = Command::new("setpriv")
            .args(["--bounding-set", &bounding, "sh", "-c", &local])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{local} from {start_owner:?} {start_mode:o}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta = std::fs::metadata(&d).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (owner.0, owner.1, 0o755),
            "from {start_owner:?} {start_mode:o}"
        );
    }
}

/// daemonset/workloads: every pod's volumes are of the kinds Pod Security
/// "restricted" allows (no hostPath), and the socket's is the CSI driver's,
/// read-only. daemonset/ runs that driver on node-agent's own directory.
#[test]
fn daemonset_workloads_mount_the_socket_through_the_csi_driver() {
    let objs = rendered("daemonset/workloads");
    let pods = pod_specs(&objs);
    assert!(!pods.is_empty());
    for (workload, pod) in &pods {
        for v in pod["volumes"].as_array().unwrap() {
            let kinds: Vec<&String> = v
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "name")
                .collect();
            assert!(
                kinds.len() == 1 && RESTRICTED_VOLUMES.contains(&kinds[0].as_str()),
                "{workload}: volume {v}"
            );
        }
        let envoy = container(pod, "containers", "envoy");
        let (mount, v) = mounted_at(pod, &envoy, "/var/run/sds");
        assert_eq!(
            v["csi"],
            json!({"driver": CSI_DRIVER, "readOnly": true}),
            "{workload}"
        );
        assert_eq!(mount["readOnly"], true, "{workload}");
    }

    let objs = rendered("daemonset");
    let driver = objs
        .iter()
        .find(|o| o["kind"] == "CSIDriver")
        .expect("a CSIDriver");
    assert_eq!(driver["metadata"]["name"], CSI_DRIVER);
    assert_eq!(driver["spec"]["volumeLifecycleModes"], json!(["Ephemeral"]));
    assert_eq!(driver["spec"]["fsGroupPolicy"], "None");
    let pod = pod(&objs, "DaemonSet/spiffe-csi-driver");
    let c = container(pod, "containers", "spiffe-csi-driver");
    let served = containers(&c, "args")
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("-workload-api-socket-dir="))
        .expect("-workload-api-socket-dir")
        .to_string();
    let (mount, v) = mounted_at(pod, &c, &served);
    assert_eq!(
        v["hostPath"]["path"], NODE_DIR,
        "the driver serves node-agent's directory"
    );
    assert_eq!(mount["readOnly"], true);
    // kubelet finds the driver at the path the registrar announces: the
    // driver's socket, seen from the node.
    let arg = |c: &Value, flag: &str| -> String {
        containers(c, "args")
            .iter()
            .find_map(|a| a.as_str()?.strip_prefix(flag).map(String::from))
            .unwrap_or_else(|| panic!("no {flag}"))
    };
    let registrar = container(pod, "containers", "node-driver-registrar");
    let socket = arg(&registrar, "-csi-address=");
    assert_eq!(socket, arg(&c, "-csi-socket-path="));
    let (dir, file) = socket.rsplit_once('/').unwrap();
    let (_, v) = mounted_at(pod, &registrar, dir);
    assert_eq!(
        arg(&registrar, "-kubelet-registration-path="),
        format!("{}/{file}", v["hostPath"]["path"].as_str().unwrap())
    );
    assert!(v["hostPath"]["path"]
        .as_str()
        .unwrap()
        .ends_with(CSI_DRIVER));
}

/// The documented alternative: daemonset-hostpath/ without the CSI driver,
/// its workloads mounting the node's directory read-only.
#[test]
fn daemonset_hostpath_mounts_the_nodes_directory() {
    let objs = rendered("daemonset-hostpath");
    assert!(objs.iter().all(|o| o["kind"] != "CSIDriver"));
    assert!(!objs.iter().any(|o| name(o).contains("spiffe-csi-driver")));
    let objs = rendered("daemonset-hostpath/workloads");
    let pods = pod_specs(&objs);
    assert!(!pods.is_empty());
    for (workload, pod) in &pods {
        let envoy = container(pod, "containers", "envoy");
        let (mount, v) = mounted_at(pod, &envoy, "/var/run/sds");
        assert_eq!(
            v,
            &json!({"name": v["name"], "hostPath": {"path": NODE_DIR, "type": "Directory"}}),
            "{workload}"
        );
        assert_eq!(mount["readOnly"], true, "{workload}");
    }
}

/// `SOCKET_DIR_CHECK=pod` turns the check off, so it is set only where the
/// socket's directory is the pod's own emptyDir (which kubelet makes 0777,
/// so that without it node-agent would not start there).
#[test]
fn socket_dir_check_pod_only_on_a_pods_own_emptydir() {
    let mut pod_volumes = 0;
    for overlay in overlays() {
        let objs = rendered(&overlay);
        // bundle-endpoint serves HTTPS and has no socket.
        for (workload, c) in node_agent_containers(&objs)
            .into_iter()
            .filter(|(_, c)| c["args"][0] != "bundle-endpoint")
        {
            let env = container_env(&c, &objs);
            let (_, v) = mounted_at(pod(&objs, &workload), &c, &socket_dir(&c, &objs));
            let what = format!("{overlay}: {workload}");
            assert_eq!(
                env.get("SOCKET_DIR_CHECK").map(String::as_str) == Some("pod"),
                v["emptyDir"].is_object(),
                "{what}: {env:?} {v}"
            );
            pod_volumes += usize::from(v["emptyDir"].is_object());
        }
    }
    assert!(pod_volumes >= 2, "{pod_volumes}");
}

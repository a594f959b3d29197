//! What an operator deploys, checked offline and against the real thing:
//!
//! - every kustomization under deploy/ renders (`kubectl kustomize`) and each
//!   object validates strictly against the Kubernetes 1.37 schemas
//!   (PyPI `kubernetes-validate`), or for the Prometheus Operator's kinds
//!   against their API (tests/ops/monitoring/), with the security settings
//!   both layouts promise;
//! - every variable the manifests give node-agent is a setting it reads (the
//!   list comes from running node-agent's own settings parser, not a copy),
//!   and the values parse;
//! - the Istio injection template puts node-agent on istio-proxy's socket
//!   ([`istio`]);
//! - the Envoy bootstrap the manifests mount runs on two real Envoys doing
//!   mTLS with certificates node-agent got from a real OpenBao, with the
//!   manifests' settings and token audience ([`envoy`]);
//! - the container image builds FROM scratch with podman and runs, as its
//!   non-root user, read-only and without capabilities ([`image`]);
//! - the bundle endpoint's Deployment is locked down, probed on its HTTPS
//!   port, and sets only variables `bundle-endpoint` reads ([`bundle_endpoint`]);
//! - the DaemonSet's socket directory is node-agent's alone, and its
//!   workloads reach it through the SPIFFE CSI driver, without hostPath
//!   ([`socket_dir`]).
//!
//! The offline checks of the rendered manifests are in this file.

use crate::support;

use serde_json::json;
use support::manifests::*;

mod bundle_endpoint;
mod envoy;
mod image;
mod istio;
mod socket_dir;

/// The layouts docs/kubernetes.md documents; each must be among the rendered overlays.
const LAYOUTS: &[&str] = &[
    "sidecar",
    "daemonset",
    "daemonset/workloads",
    "daemonset-hostpath",
    "daemonset-hostpath/workloads",
];

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
        // The Prometheus Operator's kinds are CRDs, absent from the
        // Kubernetes schemas: checked against their own API instead.
        let (operator, core): (Vec<_>, Vec<_>) = objs.into_iter().partition(|o| {
            o["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
        });
        operator
            .iter()
            .for_each(crate::monitoring::check_operator_object);
        validate_strictly(&format!("deploy/{overlay}"), &core);
    }
}

/// Both layouts: read-only root filesystems, no capabilities, no privilege
/// escalation, non-root, requests and limits on every container, and probes
/// on node-agent's status endpoints. The exceptions are named, each with the
/// one thing it needs (its manifest says why).
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
                    for r in ["requests", "limits"] {
                        for k in ["cpu", "memory"] {
                            assert!(c["resources"][r][k].is_string(), "{what}: no {r}.{k}");
                        }
                    }
                    let sc = &c["securityContext"];
                    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
                    let exception = (workload.as_str(), c["name"].as_str().unwrap());
                    // Mounts into pods' volumes, propagated to the node.
                    if exception == ("DaemonSet/spiffe-csi-driver", "spiffe-csi-driver") {
                        assert_eq!(sc["privileged"], true, "{what}");
                        continue;
                    }
                    assert!(sc["privileged"].is_null(), "{what}");
                    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
                    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}");
                    let (root_may, adds) = match exception {
                        // Gives the socket directory to node-agent's uid.
                        ("DaemonSet/node-agent", "socket-dir") => (true, json!(["CHOWN"])),
                        // Owns kubelet's plugin directories, as root does.
                        ("DaemonSet/spiffe-csi-driver", "node-driver-registrar") => {
                            (true, json!(null))
                        }
                        _ => (false, json!(null)),
                    };
                    assert_eq!(sc["capabilities"]["add"], adds, "{what}");
                    let non_root = sc["runAsNonRoot"] == true
                        || (pod_non_root && sc["runAsNonRoot"].is_null());
                    assert!(non_root || root_may, "{what} may run as root");
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
        // bundle-endpoint's settings are checked by its own parser.
        for (workload, c) in node_agent_containers(&objs)
            .into_iter()
            .filter(|(_, c)| c["args"][0] != "bundle-endpoint")
        {
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

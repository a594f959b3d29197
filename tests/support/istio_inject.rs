//! Istio 1.2x's sidecar injection, as far as node-agent's template meets it,
//! for offline checks of deploy/istio.
//!
//! Istio's injector renders each template a pod names
//! (`inject.istio.io/templates`) and merges it onto the pod with a strategic
//! merge patch, in order. The pods built here stand for what Istio's own
//! `sidecar` and `gateway` templates leave before node-agent's template is
//! merged: the containers, mounts and volumes it merges with, with the names
//! and paths of Istio's templates (`istio-proxy`, `workload-socket` on
//! `/var/run/secrets/workload-spiffe-uds`, ...). They are written from those
//! templates, not produced by Istio, which cannot run here.

use serde_json::{json, Value};

use super::manifests::{repo, yaml_docs};

/// Where istio-proxy looks for the workload socket's directory.
pub const WORKLOAD_SOCKET_DIR: &str = "/var/run/secrets/workload-spiffe-uds";
/// The SDS pipe of the `sds-grpc` cluster in Istio's Envoy bootstrap, relative
/// to istio-proxy's working directory, `/`.
pub const SDS_PIPE: &str = "./var/run/secrets/workload-spiffe-uds/socket";
/// The template's name in `sidecarInjectorWebhook.templates`.
pub const TEMPLATE: &str = "node-agent";

/// Istio's two ways to install, as (file, its `values` tree, its
/// `meshConfig`): the istiod Helm chart's values and istioctl's IstioOperator.
pub fn install_files() -> Vec<(&'static str, Value, Value)> {
    let read = |file: &str| {
        let text = std::fs::read_to_string(repo().join("deploy/istio").join(file)).unwrap();
        let mut docs = yaml_docs(&text);
        assert_eq!(docs.len(), 1, "{file}");
        docs.pop().unwrap()
    };
    let helm = read("values.yaml");
    let operator = read("istio-operator.yaml");
    assert_eq!(operator["kind"], "IstioOperator");
    assert_eq!(operator["apiVersion"], "install.istio.io/v1alpha1");
    vec![
        ("values.yaml", helm.clone(), helm["meshConfig"].clone()),
        (
            "istio-operator.yaml",
            operator["spec"]["values"].clone(),
            operator["spec"]["meshConfig"].clone(),
        ),
    ]
}

/// Which of Istio's templates comes before node-agent's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    /// `sidecar` with istio-proxy as a regular container (and istio-init).
    Sidecar,
    /// `sidecar` with istio-proxy as a native sidecar, first among the init
    /// containers (Istio 1.27+ on Kubernetes 1.33+ unless the pod says
    /// `sidecar.istio.io/nativeSidecar: "false"`).
    NativeSidecar,
    /// `gateway`: a gateway's `image: auto` istio-proxy filled in.
    Gateway,
}

fn proxy() -> Value {
    json!({
        "name": "istio-proxy",
        "image": "docker.io/istio/proxyv2:1.27.0",
        "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
        "ports": [{"containerPort": 15090, "protocol": "TCP", "name": "http-envoy-prom"}],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": 15021},
            "periodSeconds": 15, "timeoutSeconds": 3, "failureThreshold": 4
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"}
        },
        "securityContext": {
            "allowPrivilegeEscalation": false, "privileged": false,
            "readOnlyRootFilesystem": true, "runAsNonRoot": true,
            "runAsUser": 1337, "runAsGroup": 1337,
            "capabilities": {"drop": ["ALL"]}
        },
        "volumeMounts": [
            {"name": "workload-socket", "mountPath": WORKLOAD_SOCKET_DIR},
            {"name": "credential-socket", "mountPath": "/var/run/secrets/credential-uds"},
            {"name": "workload-certs", "mountPath": "/var/run/secrets/workload-spiffe-credentials"},
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio"},
            {"name": "istio-data", "mountPath": "/var/lib/istio/data"},
            {"name": "istio-envoy", "mountPath": "/etc/istio/proxy"},
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"},
            {"name": "istio-podinfo", "mountPath": "/etc/istio/pod"}
        ]
    })
}

fn istio_volumes() -> Vec<Value> {
    vec![
        json!({"name": "workload-socket", "emptyDir": {}}),
        json!({"name": "credential-socket", "emptyDir": {}}),
        json!({"name": "workload-certs", "emptyDir": {}}),
        json!({"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}),
        json!({"name": "istio-data", "emptyDir": {}}),
        json!({"name": "istio-podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
        ]}}),
        json!({"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "path": "istio-token", "expirationSeconds": 43200, "audience": "istio-ca"
        }}]}}),
        json!({"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}}),
    ]
}

fn istio_init() -> Value {
    json!({
        "name": "istio-init",
        "image": "docker.io/istio/proxyv2:1.27.0",
        "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                 "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020,15030"],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"}
        },
        "securityContext": {
            "allowPrivilegeEscalation": false, "privileged": false,
            "readOnlyRootFilesystem": false, "runAsNonRoot": false,
            "runAsUser": 0, "runAsGroup": 0,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        }
    })
}

/// The pod a workload's pod template becomes once Istio's `sidecar` (or
/// `gateway`) template is merged, before node-agent's template.
pub fn istio_injected_pod(workload: &Value, how: Injected) -> Value {
    let template = &workload["spec"]["template"];
    let mut spec = template["spec"].clone();
    let mut containers: Vec<Value> = spec["containers"].as_array().cloned().unwrap_or_default();
    let mut init: Vec<Value> = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    match how {
        Injected::Gateway => {
            let p = containers
                .iter_mut()
                .find(|c| c["name"] == "istio-proxy")
                .expect("a gateway declares istio-proxy with image: auto");
            assert_eq!(p["image"], "auto");
            let mut filled = proxy();
            filled["args"][1] = json!("router");
            for (k, v) in p.as_object().unwrap() {
                if k != "image" && k != "volumeMounts" {
                    filled[k] = v.clone();
                }
            }
            *p = filled;
        }
        Injected::Sidecar => {
            init.push(istio_init());
            containers.push(proxy());
        }
        Injected::NativeSidecar => {
            let mut p = proxy();
            p["restartPolicy"] = json!("Always");
            init.insert(0, p);
            init.insert(0, istio_init());
        }
    }
    spec["containers"] = json!(containers);
    if !init.is_empty() {
        spec["initContainers"] = json!(init);
    }
    let mut volumes: Vec<Value> = spec["volumes"].as_array().cloned().unwrap_or_default();
    volumes.extend(istio_volumes());
    spec["volumes"] = json!(volumes);
    let mut metadata = template["metadata"].clone();
    metadata["name"] = workload["metadata"]["name"].clone();
    json!({ "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec })
}

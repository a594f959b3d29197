//! Rendering and checking what deploy/ holds, offline: kustomize overlays
//! (`kubectl kustomize`), YAML as JSON values (PyYAML), strict validation
//! against the Kubernetes schemas (PyPI `kubernetes-validate`), strategic
//! merge patches as the API machinery applies them (`kubectl patch --local`),
//! and node-agent's own settings parser as the judge of env names.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.37.0";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (./test.sh installs the tools)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every directory under deploy/ with a kustomization.yaml, relative to deploy/.
pub fn overlays() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.file_name().unwrap() == "kustomization.yaml" {
                out.push(
                    p.parent()
                        .unwrap()
                        .strip_prefix(root)
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let root = repo().join("deploy");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

/// YAML documents as JSON values (PyYAML, beside kubernetes-validate).
pub fn yaml_docs(yaml: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\nprint(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with PyYAML (the peers virtualenv)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not YAML:\n{yaml}");
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn kustomize(overlay: &str) -> String {
    run(Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy").join(overlay)))
}

pub fn rendered(overlay: &str) -> Vec<Value> {
    yaml_docs(&kustomize(overlay))
}

pub fn name(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["kind"].as_str().unwrap(),
        obj["metadata"]["name"].as_str().unwrap()
    )
}

/// The pod specs among `objs`: workloads' pod templates, and pods.
pub fn pod_specs(objs: &[Value]) -> Vec<(String, &Value)> {
    objs.iter()
        .filter_map(|o| match o["kind"].as_str().unwrap() {
            "Deployment" | "DaemonSet" | "StatefulSet" => {
                Some((name(o), &o["spec"]["template"]["spec"]))
            }
            "Pod" => Some((name(o), &o["spec"])),
            _ => None,
        })
        .collect()
}

pub fn containers(pod: &Value, key: &str) -> Vec<Value> {
    pod[key].as_array().cloned().unwrap_or_default()
}

/// node-agent's containers among `objs` (its image), with their workload:
/// regular containers and native sidecars (restartable init containers).
pub fn node_agent_containers(objs: &[Value]) -> Vec<(String, Value)> {
    pod_specs(objs)
        .into_iter()
        .flat_map(|(n, pod)| {
            ["containers", "initContainers"]
                .into_iter()
                .flat_map(|key| containers(pod, key))
                .filter(|c| {
                    c["image"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("node-agent")
                })
                .map(move |c| (n.clone(), c))
        })
        .collect()
}

/// The environment a container gets: `envFrom` ConfigMaps (from the same
/// render) then `env` values.
pub fn container_env(c: &Value, objs: &[Value]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let cm = from["configMapRef"]["name"].as_str().expect("configMapRef");
        let obj = objs
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == cm)
            .unwrap_or_else(|| panic!("envFrom names ConfigMap {cm}, which the overlay lacks"));
        for (k, v) in obj["data"].as_object().unwrap() {
            env.insert(k.clone(), v.as_str().unwrap().to_string());
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let value = e["value"]
            .as_str()
            .unwrap_or_else(|| panic!("env {} must have a value", e["name"]));
        env.insert(e["name"].as_str().unwrap().to_string(), value.to_string());
    }
    env
}

/// The names node-agent's settings parser reads, given `env`: every variable
/// it looks up, retried without each variable whose value it refuses (e.g. a
/// file path of the cluster), so that the later ones are read too.
pub fn names_read(env: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut env = env.clone();
    let read = RefCell::new(BTreeSet::new());
    for _ in 0..=env.len() {
        let lookup = |k: &str| {
            read.borrow_mut().insert(k.to_string());
            env.get(k).cloned()
        };
        match node_agent::config::Config::from_lookup(lookup, None) {
            Ok(_) => return read.into_inner(),
            Err(e) => {
                assert!(
                    env.remove(e.var).is_some(),
                    "the settings parser refuses a setting the manifest does not set: {e}"
                );
            }
        }
    }
    panic!("the settings parser never accepted {env:?}");
}

/// Every name node-agent's settings parser reads: with the local CA (the
/// fewest), and with Vault given only Istio 1.1's `CA_ADDR` (which reads the
/// fallback for `VAULT_ADDR` too).
pub fn known_settings() -> BTreeSet<String> {
    let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut known = names_read(&env(&[("CA_PROVIDER", "LocalCA")]));
    known.extend(names_read(&env(&[
        ("CA_PROVIDER", "VaultCA"),
        ("CA_ADDR", "https://vault:8200"),
        ("VAULT_AUTH_PATH", "auth/kubernetes/login"),
        ("VAULT_ROLE", "istio-cert"),
        ("VAULT_SIGN_CSR_PATH", "istio_ca/sign/istio-pki-role"),
    ])));
    known
}

/// Asserts that every name in `env` is a node-agent setting and that the
/// values parse, with a real PEM file standing in for the `VAULT_TLS_ROOT_CERT`
/// the cluster mounts. Returns how many names were checked.
pub fn check_settings(what: &str, env: &BTreeMap<String, String>) -> usize {
    let mut known = known_settings();
    known.extend(names_read(env));
    for var in env.keys() {
        assert!(
            known.contains(var),
            "{what} sets {var}, which node-agent does not read; it reads {known:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut env = env.clone();
    if env.contains_key("VAULT_TLS_ROOT_CERT") {
        let ca = node_agent::ca::local::LocalCa::new(None, "cluster.local").unwrap();
        let pem = dir.path().join("ca.crt");
        std::fs::write(&pem, ca.root_pem()).unwrap();
        env.insert("VAULT_TLS_ROOT_CERT".into(), pem.display().to_string());
    }
    node_agent::config::Config::from_lookup(|k| env.get(k).cloned(), None)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    env.len()
}

/// Validates `objs` strictly against the Kubernetes schemas: one verdict per
/// object, every one a pass, nothing skipped.
pub fn validate_strictly(what: &str, objs: &[Value]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.json");
    // A JSON document per line is YAML too.
    let text: Vec<String> = objs.iter().map(|o| o.to_string()).collect();
    std::fs::write(&file, text.join("\n---\n")).unwrap();
    let out = run(Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .arg(&file));
    let passed = out
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(
        passed,
        objs.len(),
        "{what}: {passed} of {} objects validated:\n{out}",
        objs.len()
    );
    assert!(
        !out.contains("WARN") && !out.contains("ERROR"),
        "{what}:\n{out}"
    );
}

/// `patch` (YAML) applied to `obj` as a strategic merge patch, the way the
/// API machinery merges it (Istio's injector uses the same library to merge
/// its templates onto a pod): `kubectl patch --local`, offline.
pub fn strategic_merge(obj: &Value, patch: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (file, patch_file) = (dir.path().join("obj.json"), dir.path().join("patch.yaml"));
    std::fs::write(&file, obj.to_string()).unwrap();
    std::fs::write(&patch_file, patch).unwrap();
    let out = run(Command::new("kubectl")
        .args([
            "patch",
            "--local",
            "--type",
            "strategic",
            "-o",
            "json",
            "-f",
        ])
        .arg(&file)
        .arg("--patch-file")
        .arg(&patch_file));
    serde_json::from_str(&out).unwrap()
}

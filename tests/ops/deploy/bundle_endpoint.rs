//! deploy/bundle-endpoint/, offline: (its rendering and strict validation
//! are in `every_overlay_renders_and_validates_strictly`) the Deployment is
//! locked down like the agent's layouts, probed on its HTTPS port, mounts
//! its certificate and key from a Secret where its settings point, and sets
//! only variables `node-agent bundle-endpoint` reads, whose values its own
//! parsers accept (the flags' environment names come from clap, the Vault
//! settings from the agent's parser).

use std::collections::{BTreeMap, BTreeSet};

use clap::{Args as _, FromArgMatches as _};
use serde_json::{json, Value};

use crate::support::manifests::*;
use node_agent::cli::bundle_endpoint::{settings, Args};

const OVERLAY: &str = "bundle-endpoint";

fn container(objs: &[Value]) -> Value {
    let found = node_agent_containers(objs);
    assert_eq!(found.len(), 1, "{found:?}");
    let (workload, c) = found.into_iter().next().unwrap();
    assert_eq!(workload, "Deployment/bundle-endpoint");
    c
}

#[test]
fn the_bundle_endpoint_is_locked_down_and_probed_on_https() {
    let objs = rendered(OVERLAY);
    let pods = pod_specs(&objs);
    assert_eq!(pods.len(), 1);
    let pod = pods[0].1;
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let c = container(&objs);
    assert_eq!(c["args"], json!(["bundle-endpoint"]));
    for r in ["requests", "limits"] {
        for k in ["cpu", "memory"] {
            assert!(c["resources"][r][k].is_string(), "no {r}.{k}");
        }
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["privileged"].is_null() && sc["capabilities"]["add"].is_null());

    let env = container_env(&c, &objs);
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(c["ports"][0]["name"], "https");
    assert_eq!(env["BUNDLE_ENDPOINT_ADDR"], format!("0.0.0.0:{port}"));
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/", "port": "https", "scheme": "HTTPS"})
    );
    assert_eq!(c["livenessProbe"]["tcpSocket"], json!({"port": "https"}));

    // The certificate and key come from a Secret volume, where the settings point.
    let secret_mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == m["name"] && v["secret"].is_object())
        })
        .expect("a Secret volume mounted");
    assert!(
        secret_mount["subPath"].is_null(),
        "a subPath is never updated"
    );
    let dir = secret_mount["mountPath"].as_str().unwrap();
    assert_eq!(env["BUNDLE_ENDPOINT_CERT"], format!("{dir}/tls.crt"));
    assert_eq!(env["BUNDLE_ENDPOINT_KEY"], format!("{dir}/tls.key"));

    let service = objs
        .iter()
        .find(|o| o["kind"] == "Service")
        .expect("a Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "https");
}

#[test]
fn every_variable_it_sets_is_a_bundle_endpoint_setting_that_parses() {
    let objs = rendered(OVERLAY);
    let env = container_env(&container(&objs), &objs);
    let command = Args::augment_args(clap::Command::new("bundle-endpoint"));
    let flags: BTreeMap<String, String> = command
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_str()?.to_string(),
                a.get_long()?.to_string(),
            ))
        })
        .collect();
    assert!(flags.contains_key("BUNDLE_ENDPOINT_CERT"), "{flags:?}");
    let used: BTreeSet<&str> = settings::USED_AGENT_VARS.iter().copied().collect();
    // The agent's settings of ../base that it ignores must still be agent
    // settings (shared vault.env), and not look like its own.
    let agent = known_settings();
    let mut own = 0;
    for var in env.keys() {
        if flags.contains_key(var) || used.contains(var.as_str()) {
            own += 1;
        } else {
            assert!(
                agent.contains(var) && !var.starts_with("BUNDLE_ENDPOINT"),
                "{var} is neither a bundle-endpoint setting ({flags:?}, {used:?}) nor an agent one"
            );
        }
    }
    assert!(own >= 6, "only {own} of its settings set: {env:?}");

    // The values parse: the flags through clap, the Vault settings through
    // the agent's parser (a real PEM file for the CA the cluster mounts).
    let mut argv = vec!["bundle-endpoint".to_string()];
    for (var, long) in &flags {
        if let Some(v) = env.get(var) {
            argv.push(format!("--{long}={v}"));
        }
    }
    let matches = command
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    Args::from_arg_matches(&matches).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = node_agent::ca::local::LocalCa::new(None, "cluster.local").unwrap();
    let pem = dir.path().join("ca.crt");
    std::fs::write(&pem, ca.root_pem()).unwrap();
    let vault = settings::vault_settings(|k| match k {
        "VAULT_TLS_ROOT_CERT" if env.contains_key(k) => Some(pem.display().to_string()),
        _ => env.get(k).cloned(),
    })
    .unwrap_or_else(|e| panic!("deploy/{OVERLAY}: {e}"));
    assert_eq!(vault.vault.pki_mount, "istio_ca");

    // The check can fail: a near miss is neither.
    for typo in ["BUNDLE_ENDPOINT_CERTS", "BUNDLE_ENDPOINT_PORT"] {
        assert!(!flags.contains_key(typo) && !agent.contains(typo));
    }
}

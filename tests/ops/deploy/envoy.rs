//! The Envoy bootstrap the manifests mount, run on two real Envoys doing mTLS
//! with certificates node-agent got from a real OpenBao, with the manifests'
//! settings and token audience.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::agent::Agent;
use support::envoy::{free_port, start_backend, validate_config, EnvoyProc};
use support::manifests::*;
use support::vault_env::VaultEnv;

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
    let (backend, _backend) = start_backend("hello from httpbin").await;
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

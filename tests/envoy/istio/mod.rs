//! node-agent on Istio 1.2x's workload socket, against the real thing: two
//! real Envoys configured exactly as istio-agent and istiod configure a
//! sidecar's (the `sds-grpc` cluster on the `pipe`
//! `./var/run/secrets/workload-spiffe-uds/socket`, `envoy_grpc` SDS sources
//! with `set_node_on_first_message_only` and `initial_fetch_timeout: 0s`,
//! `default` and `ROOTCA`, no credential), each in its own "pod" directory
//! with its own node-agent in one-workload mode, run with the settings of
//! deploy/istio's injection template, against a real OpenBao configured by
//! `node-agent vault-setup` for the mesh's (non-default) trust domain, as
//! docs/istio.md does.
//!
//! This file builds the pods from deploy/istio's template; [`mesh`] runs
//! them: while requests go through both Envoys on new connections twice a
//! second, a rotation reaches both Envoys and one node-agent is restarted.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::agent::Agent;
use support::istio_inject::{install_files, TEMPLATE};
use support::manifests::yaml_docs;

mod mesh;

const READY: Duration = Duration::from_secs(60);
/// The test's certificate lifetime: renewed after about half of it.
const SECRET_TTL: &str = "20s";

/// deploy/istio's template: node-agent's container and the pod's volumes.
struct Template {
    env: BTreeMap<String, String>,
    /// The mesh's trust domain (`meshConfig.trustDomain`).
    trust_domain: String,
    /// The audience of the projected token node-agent reads.
    audience: String,
}

impl Template {
    fn load() -> Template {
        let (_, values, mesh) = install_files().remove(0);
        let text = values["sidecarInjectorWebhook"]["templates"][TEMPLATE]
            .as_str()
            .unwrap()
            .to_string();
        let spec = yaml_docs(&text).remove(0)["spec"].clone();
        let agent = spec["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "node-agent")
            .unwrap()
            .clone();
        let env = agent["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["value"].as_str().unwrap().to_string(),
                )
            })
            .collect::<BTreeMap<_, _>>();
        let token_dir = Path::new(&env["WORKLOAD_TOKEN_PATH"])
            .parent()
            .unwrap()
            .to_path_buf();
        let mount = agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == token_dir)
            .unwrap()
            .clone();
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap()
            .clone();
        let audience = volume["projected"]["sources"][0]["serviceAccountToken"]["audience"]
            .as_str()
            .unwrap()
            .to_string();
        Template {
            env,
            trust_domain: mesh["trustDomain"].as_str().unwrap().to_string(),
            audience,
        }
    }
}

/// A pod's filesystem as its containers share it: node-agent's socket and
/// the projected token under the pod's root, Envoy running in that root.
struct Pod {
    root: tempfile::TempDir,
    socket: PathBuf,
    env: Vec<(String, String)>,
}

impl Pod {
    /// The template's settings, with this machine's Vault and the pod's paths.
    fn new(template: &Template, vault: &[(String, String)], jwt: &str) -> Pod {
        let root = tempfile::tempdir().unwrap();
        let under_root = |p: &str| root.path().join(p.trim_start_matches('/'));
        let socket = under_root(&template.env["WORKLOAD_UDS_PATH"]);
        let token = under_root(&template.env["WORKLOAD_TOKEN_PATH"]);
        std::fs::create_dir_all(token.parent().unwrap()).unwrap();
        std::fs::write(&token, jwt).unwrap();
        let mut env: BTreeMap<String, String> = template.env.clone();
        for (k, v) in vault {
            if k == "VAULT_ADDR" || k == "VAULT_TLS_ROOT_CERT" {
                env.insert(k.clone(), v.clone());
            }
        }
        env.insert("WORKLOAD_UDS_PATH".into(), socket.display().to_string());
        env.insert("WORKLOAD_TOKEN_PATH".into(), token.display().to_string());
        env.insert(
            "STATUS_ADDR".into(),
            format!("127.0.0.1:{}", support::ports::free_port()),
        );
        env.insert("SECRET_TTL".into(), SECRET_TTL.into());
        Pod {
            root,
            socket,
            env: env.into_iter().collect(),
        }
    }

    async fn start_agent(&self) -> Agent {
        let env: Vec<(&str, String)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let agent = Agent::spawn(&self.socket, self.root.path(), &env);
        agent
            .log_shows("SDS gRPC server start", Duration::from_secs(30))
            .await;
        agent
    }
}

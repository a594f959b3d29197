//! deploy/istio: node-agent's injection template, merged onto Istio's own pod
//! templates as Istio's injector merges it, yields pods that validate and put
//! node-agent, as a native sidecar, on the socket istio-proxy's Envoy dials.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use support::manifests::*;

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
    // kubelet makes an emptyDir 0777: node-agent is told it is the pod's own.
    assert_eq!(
        env.get("SOCKET_DIR_CHECK").map(String::as_str),
        Some("pod"),
        "{what}"
    );

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

//! What a sidecar's Envoy gets from Istio 1.2x, reproduced for tests field for
//! field:
//!
//! - istio-agent's bootstrap (`tools/packaging/common/envoy_bootstrap.json`):
//!   the static cluster `sds-grpc`, HTTP/2 on the `pipe`
//!   `./var/run/secrets/workload-spiffe-uds/socket`, relative to the proxy's
//!   working directory (`/` in a pod), and a node as istio-agent names it;
//! - istiod's SDS sources (`pkg/model/authentication.go`) in every TLS
//!   context: `envoy_grpc` to `sds-grpc`, `set_node_on_first_message_only`,
//!   `initial_fetch_timeout: 0s`, resource names `default` and `ROOTCA`, no
//!   credential (the SDS server knows its one workload);
//! - istiod's mTLS contexts around them: an inbound listener that requires a
//!   client certificate of the mesh's trust domain, an outbound cluster that
//!   checks the server's exact SPIFFE ID.
//!
//! Listeners and clusters are cut down to one inbound and one outbound path
//! on loopback; the SDS parts are exactly istiod's.

use serde_json::{json, Value};

use super::envoy::{
    HDR_CLIENT_SAW_SERVER_URI, HDR_SERVER_LOCAL_URI, HDR_SERVER_SAW_CLIENT_SERIAL,
    HDR_SERVER_SAW_CLIENT_URI,
};
use super::istio_inject::SDS_PIPE;

/// The bootstrap's static cluster for SDS (`model.SDSClusterName`).
pub const SDS_CLUSTER: &str = "sds-grpc";

/// A workload of the mesh, as istio-agent describes its proxy.
pub struct Workload<'a> {
    pub app: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub pod: &'a str,
    pub ip: &'a str,
}

impl Workload<'_> {
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// The bootstrap's node: istio-agent's id and cluster, and a metadata
    /// struct of the kind it sends (Envoy sends it on each stream's first
    /// request only).
    fn node(&self, trust_domain: &str) -> Value {
        let (app, ns, pod, ip) = (self.app, self.namespace, self.pod, self.ip);
        json!({
            "id": format!("sidecar~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
            "cluster": format!("{app}.{ns}"),
            "locality": {},
            "metadata": {
                "ANNOTATIONS": {
                    "inject.istio.io/templates": "sidecar,node-agent",
                    "sidecar.istio.io/nativeSidecar": "false",
                    "sidecar.istio.io/status": "{\"initContainers\":[\"node-agent\",\"istio-init\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"workload-socket\",\"node-agent-token\",\"vault-ca\",\"istio-envoy\",\"istio-data\",\"istio-podinfo\",\"istio-token\",\"istiod-ca-cert\"]}"
                },
                "APP_CONTAINERS": app,
                "CLUSTER_ID": "Kubernetes",
                "ENVOY_PROMETHEUS_PORT": 15090,
                "ENVOY_STATUS_PORT": 15021,
                "INSTANCE_IPS": ip,
                "INTERCEPTION_MODE": "REDIRECT",
                "ISTIO_VERSION": "1.27.0",
                "LABELS": {
                    "app": app,
                    "security.istio.io/tlsMode": "istio",
                    "service.istio.io/canonical-name": app,
                    "service.istio.io/canonical-revision": "latest"
                },
                "MESH_ID": trust_domain,
                "NAME": pod,
                "NAMESPACE": ns,
                "NODE_NAME": "node-1",
                "OWNER": format!("kubernetes://apis/apps/v1/namespaces/{ns}/deployments/{app}"),
                "PILOT_SAN": ["istiod.istio-system.svc"],
                "POD_PORTS": "[{\"name\":\"http\",\"containerPort\":8080,\"protocol\":\"TCP\"}]",
                "PROXY_CONFIG": {
                    "binaryPath": "/usr/local/bin/envoy",
                    "configPath": "./etc/istio/proxy",
                    "controlPlaneAuthPolicy": "MUTUAL_TLS",
                    "discoveryAddress": "istiod.istio-system.svc:15012",
                    "drainDuration": "45s",
                    "proxyAdminPort": 15000,
                    "serviceCluster": "istio-proxy",
                    "statNameLength": 189,
                    "statusPort": 15020,
                    "terminationDrainDuration": "5s"
                },
                "SERVICE_ACCOUNT": self.service_account,
                "WORKLOAD_NAME": app
            }
        })
    }
}

/// istio-agent's `sds-grpc` cluster, as its bootstrap template has it.
pub fn sds_grpc_cluster() -> Value {
    json!({
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        },
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "pipe": { "path": SDS_PIPE }
            }}}]}]
        }
    })
}

/// istiod's `SdsSecretConfig` for `default` or `ROOTCA`.
pub fn sds_secret_config(name: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "set_node_on_first_message_only": true,
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": SDS_CLUSTER } }]
            },
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3"
        }
    })
}

/// istiod's `CommonTlsContext` for mesh mTLS: `default` as the certificate,
/// `ROOTCA` as the trust bundle, and the peer's SANs matched as given.
fn common_tls_context(alpn: &[&str], match_sans: Value) -> Value {
    json!({
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_2",
            "tls_maximum_protocol_version": "TLSv1_3"
        },
        "alpn_protocols": alpn,
        "tls_certificate_sds_secret_configs": [sds_secret_config("default")],
        "combined_validation_context": {
            "default_validation_context": { "match_subject_alt_names": match_sans },
            "validation_context_sds_secret_config": sds_secret_config("ROOTCA")
        }
    })
}

fn http_connection_manager(stat_prefix: &str, cluster: &str, headers: &[(&str, &str)]) -> Value {
    let headers: Vec<Value> = headers
        .iter()
        .map(|(k, v)| {
            json!({
                "header": { "key": k, "value": v },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
            })
        })
        .collect();
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
                }],
                "response_headers_to_add": headers
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
            }]
        }
    })
}

fn loopback_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": "127.0.0.1", "port_value": port }
            }}}]}]
        }
    })
}

fn bootstrap(w: &Workload, trust_domain: &str, listener: Value, mut clusters: Vec<Value>) -> Value {
    clusters.push(sds_grpc_cluster());
    json!({
        "node": w.node(trust_domain),
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": { "listeners": [listener], "clusters": clusters }
    })
}

/// The server side: inbound mTLS on `listen_port` requiring a client
/// certificate of `trust_domain` (istiod's prefix match on
/// `spiffe://<trust domain>/`), then plain HTTP to the app on `app_port`.
/// Responses say which client identity and serial were verified.
pub fn server_bootstrap(
    w: &Workload,
    trust_domain: &str,
    listen_port: u16,
    app_port: u16,
) -> Value {
    let inbound = format!("inbound|{app_port}||");
    let hcm = http_connection_manager(
        "inbound_0.0.0.0_8080",
        &inbound,
        &[
            (HDR_SERVER_SAW_CLIENT_URI, "%DOWNSTREAM_PEER_URI_SAN%"),
            (HDR_SERVER_SAW_CLIENT_SERIAL, "%DOWNSTREAM_PEER_SERIAL%"),
            (HDR_SERVER_LOCAL_URI, "%DOWNSTREAM_LOCAL_URI_SAN%"),
        ],
    );
    let listener = json!({
        "name": "virtualInbound",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": listen_port } },
        "filter_chains": [{
            "filters": [hcm],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": common_tls_context(
                        &["h2", "http/1.1"],
                        json!([{ "prefix": format!("spiffe://{trust_domain}/") }]),
                    ),
                    "require_client_certificate": true
                }
            }
        }]
    });
    bootstrap(
        w,
        trust_domain,
        listener,
        vec![loopback_cluster(&inbound, app_port)],
    )
}

/// The client side: plain HTTP from the app on `listen_port`, mTLS to the
/// server on `server_port` whose certificate must name exactly `server_id`
/// (istiod's exact match for the destination's service account).
pub fn client_bootstrap(
    w: &Workload,
    trust_domain: &str,
    listen_port: u16,
    server_port: u16,
    server_id: &str,
) -> Value {
    let outbound = "outbound|8000||httpbin.default.svc.cluster.local";
    let hcm = http_connection_manager(
        "outbound_0.0.0.0_8000",
        outbound,
        &[(HDR_CLIENT_SAW_SERVER_URI, "%UPSTREAM_PEER_URI_SAN%")],
    );
    let listener = json!({
        "name": "virtualOutbound",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": listen_port } },
        "filter_chains": [{ "filters": [hcm] }]
    });
    let mut cluster = loopback_cluster(outbound, server_port);
    cluster["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls_context(
                &["istio-http/1.1", "istio", "http/1.1"],
                json!([{ "exact": server_id }]),
            ),
            "sni": "outbound_.8000_._.httpbin.default.svc.cluster.local"
        }
    });
    bootstrap(w, trust_domain, listener, vec![cluster])
}

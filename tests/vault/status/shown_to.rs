//! Who is shown what names a workload: `/debug/identities` and the metric
//! series labelled with an identity go to loopback clients only, unless
//! `STATUS_DEBUG_FROM` widens that; everyone gets the node-wide metrics.
//! The agent listens on every interface, and is asked over loopback and
//! over this machine's own non-loopback address.

use crate::support;

use support::agent::Agent;
use support::metrics::{scrape, Scrape};
use support::net::non_loopback_ipv4;
use support::sds_client::*;

use super::{get, SPIFFE_A};

/// An agent on every interface (`debug_from`: its STATUS_DEBUG_FROM, if
/// any) serving one identity.
async fn agent_with_an_identity(debug_from: Option<&str>) -> (Agent, u16) {
    let port = support::ports::free_port();
    let mut env = vec![
        ("CA_PROVIDER", "LocalCA".to_string()),
        ("STATUS_ADDR", format!("0.0.0.0:{port}")),
    ];
    if let Some(v) = debug_from {
        env.push(("STATUS_DEBUG_FROM", v.to_string()));
    }
    let agent = Agent::start(&env);
    let mut client = connect(&agent.socket).await;
    fetch(&mut client, &["default"], &fake_jwt("default", "httpbin"))
        .await
        .expect("served");
    (agent, port)
}

/// What a client at `host` sees: the page's status and body, and the metrics.
async fn seen_from(host: &str, port: u16) -> (u16, String, Scrape) {
    let (code, page) = get(&format!("http://{host}:{port}/debug/identities")).await;
    let metrics = scrape(&format!("http://{host}:{port}/metrics"), "openmetrics").await;
    (code, page, metrics)
}

fn expiry(m: &Scrape) -> Option<f64> {
    m.value(
        "node_agent_certificate_expiry_timestamp_seconds",
        &[("identity", SPIFFE_A)],
    )
}

#[tokio::test]
async fn workloads_are_shown_to_loopback_only_unless_widened() {
    let ip = non_loopback_ipv4().to_string();

    let (agent, port) = agent_with_an_identity(None).await;
    let (code, page, metrics) = seen_from("127.0.0.1", port).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(SPIFFE_A), "{page}");
    assert!(expiry(&metrics).is_some(), "{}", metrics.text);

    let (code, page, metrics) = seen_from(&ip, port).await;
    assert_eq!(code, 403, "from {ip}: {page}");
    assert!(page.contains("STATUS_DEBUG_FROM=loopback"), "{page}");
    assert!(!page.contains("spiffe://"), "{page}");
    assert!(
        !metrics.text.contains("spiffe://"),
        "from {ip}:\n{}",
        metrics.text
    );
    assert!(metrics
        .samples
        .iter()
        .all(|s| !s.labels.contains_key("identity")));
    // The node-wide series stay, for alerts scraped over the pod IP.
    assert_eq!(metrics.get("node_agent_identities_cached", &[]), 1.0);
    assert_eq!(
        metrics.get(
            "node_agent_ca_requests_total",
            &[("kind", "sign"), ("outcome", "ok")]
        ),
        1.0
    );
    let (code, _) = get(&format!("http://{ip}:{port}/healthz/live")).await;
    assert_eq!(code, 200, "probes are answered to anyone");
    drop(agent);

    let (_agent, port) = agent_with_an_identity(Some("any")).await;
    for host in ["127.0.0.1", ip.as_str()] {
        let (code, page, metrics) = seen_from(host, port).await;
        assert_eq!(code, 200, "from {host}: {page}");
        assert!(page.contains(SPIFFE_A), "from {host}: {page}");
        assert!(expiry(&metrics).is_some(), "from {host}:\n{}", metrics.text);
    }
}

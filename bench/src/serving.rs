//! Cached serving, each figure next to the floor's: one agent with one
//! identity cached, and the floor (`floor_server`) answering with that
//! agent's bytes; for each load shape, h2load runs against both back to
//! back with the same arguments (which goes first alternates from shape to
//! shape, so that neither always meets the machine as the other left it).

use std::path::Path;

use anyhow::{ensure, Context};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryResponse,
};
use prost::Message;

use crate::floor::{self, Bodies, FloorProc};
use crate::h2load::{self, Run, Server, Serving};
use crate::measure::agent_env;
use crate::report::{Cached, Paired};
use crate::vault::{self, VaultBench};
use crate::{procs, sds, Sizes};
use node_agent::client::sds as sds_client;
use node_agent::crypto::KeyType;

/// Connections × streams per connection of each cached `FetchSecrets` run.
pub const FETCH_SHAPES: [(usize, usize); 4] = [(1, 1), (100, 1), (10, 10), (1000, 1)];
/// Connections × streams per connection of each new-stream run
/// (`StreamSecrets` and `DeltaSecrets`, Envoy's request).
pub const NEW_STREAM_SHAPES: [(usize, usize); 3] = [(1, 1), (10, 10), (100, 10)];

/// What the floor is, for the report.
pub const FLOOR: &str = "tonic on a Unix socket, same h2, runtime and HTTP/2 settings as the agent, \
answering every call with the bytes node-agent answered it with (captured once, checked byte for byte); \
it decodes no request and looks nothing up";

pub async fn cached_serving(
    v: &VaultBench,
    bin: &Path,
    work: &Path,
    s: &Sizes,
    generator: String,
) -> anyhow::Result<Cached> {
    let mut agent =
        procs::AgentProc::start(bin, work, "cached", &agent_env(v, KeyType::EcP256, 1000)).await?;
    let jwt = v.mint(&["cached".to_string()]).remove(0);
    // Cache the identity first, and check that a fetch serves it.
    let mut client = sds::connect(&agent.socket).await?;
    let resp = client
        .fetch_secrets(sds_client::with_jwt(sds::request("default", "warm"), &jwt))
        .await?
        .into_inner();
    ensure!(sds_client::served_identity(&resp)? == vault::spiffe_id("cached"));
    drop(client);
    // FetchSecrets as a small client asks (names only); a new stream as
    // Envoy opens one (with its node).
    let bodies = Bodies {
        fetch: work.join("fetch-request.bin"),
        stream: work.join("stream-request.bin"),
        delta: work.join("delta-request.bin"),
    };
    h2load::write_body(&bodies.fetch, sds_client::request(&["default"], None))?;
    let node_id = "sidecar~10.0.0.1~h2load.bench~bench.svc.cluster.local";
    h2load::write_body(&bodies.stream, sds::request("default", node_id))?;
    h2load::write_body(
        &bodies.delta,
        DeltaDiscoveryRequest {
            node: Some(sds::node(node_id)),
            resource_names_subscribe: vec!["default".into()],
            type_url: sds_client::SECRET_TYPE_URL.into(),
            ..Default::default()
        },
    )?;

    let answers = floor::capture(&agent.socket, &bodies, &jwt).await?;
    for (method, answer) in [
        ("FetchSecrets", &answers.fetch),
        ("StreamSecrets", &answers.stream),
    ] {
        let resp = DiscoveryResponse::decode(answer.clone())?;
        ensure!(
            sds_client::served_identity(&resp)? == vault::spiffe_id("cached"),
            "node-agent's answer to {method} does not serve the cached identity"
        );
    }
    let delta = DeltaDiscoveryResponse::decode(answers.delta.clone())?;
    ensure!(
        delta
            .resources
            .iter()
            .any(|r| r.name == "default" && r.resource.is_some()),
        "node-agent's answer to DeltaSecrets does not carry `default`"
    );
    let mut floor = FloorProc::start(&work.join("floor"), &answers).await?;
    floor::verify(&floor.socket, &bodies, &jwt, &answers)
        .await
        .context("the floor's answers are not node-agent's")?;
    eprintln!(
        "bench: the floor answers FetchSecrets ({} B), StreamSecrets ({} B) and DeltaSecrets ({} B) with node-agent's bytes",
        answers.fetch.len(),
        answers.stream.len(),
        answers.delta.len()
    );

    let run = Run {
        jwt: &jwt,
        work,
        duration: s.serve,
        warm_up: s.warm_up,
    };
    let servers = [
        Server {
            name: "floor",
            socket: &floor.socket,
            pid: floor.pid(),
        },
        Server {
            name: "agent",
            socket: &agent.socket,
            pid: agent.pid(),
        },
    ];
    let mut measured: [Vec<Paired>; 3] = Default::default();
    let methods = [
        (h2load::FETCH, &bodies.fetch, &FETCH_SHAPES[..]),
        (h2load::STREAM, &bodies.stream, &NEW_STREAM_SHAPES[..]),
        (h2load::DELTA, &bodies.delta, &NEW_STREAM_SHAPES[..]),
    ];
    let mut turn = 0;
    for (out, (path, body, shapes)) in measured.iter_mut().zip(methods) {
        for &(conns, per) in shapes {
            out.push(pair(&run, &servers, turn % 2 == 0, path, body, conns, per).await?);
            turn += 1;
        }
    }
    let [fetch_secrets, new_stream, delta_new_stream] = measured;
    agent.check_alive()?;
    floor.check_alive()?;
    drop(floor);
    agent.stop();
    Ok(Cached {
        generator,
        floor: FLOOR.into(),
        answer_bytes: [
            answers.fetch.len(),
            answers.stream.len(),
            answers.delta.len(),
        ],
        fetch_secrets,
        new_stream,
        delta_new_stream,
    })
}

/// One load shape against the floor and the agent, back to back.
async fn pair(
    run: &Run<'_>,
    [floor, agent]: &[Server<'_>; 2],
    floor_first: bool,
    path: &str,
    body: &Path,
    connections: usize,
    streams: usize,
) -> anyhow::Result<Paired> {
    let measure = |server| run.run(server, path, body, connections, streams);
    let (floor, agent) = if floor_first {
        let f = measure(floor).await?;
        (f, measure(agent).await?)
    } else {
        let a = measure(agent).await?;
        (measure(floor).await?, a)
    };
    // The same answers, so about the same bytes per response: each
    // connection's own frames (SETTINGS and their ACKs) are shared among
    // its responses, which are few at 1000 connections in a short run.
    ensure!(
        (agent.bytes_per_response / floor.bytes_per_response - 1.0).abs() <= 0.1,
        "{} at {connections}×{streams}: node-agent's responses carry {:.0} bytes, the floor's {:.0}",
        agent.method,
        agent.bytes_per_response,
        floor.bytes_per_response
    );
    let p = Paired::new(floor, agent);
    eprintln!(
        "bench: {:<13} {:>4}×{:<2} req/s floor {:>6.0} agent {:>6.0} ({:.2}); CPU per request floor {:.1} µs agent {:.1} µs ({:.2})",
        p.method,
        connections,
        streams,
        p.floor.req_per_s,
        p.agent.req_per_s,
        p.req_per_s_ratio,
        p.floor.server_cpu_us_per_request,
        p.agent.server_cpu_us_per_request,
        p.cpu_per_request_ratio,
    );
    Ok(p)
}

impl Paired {
    /// The agent's figures over the floor's.
    pub fn new(floor: Serving, agent: Serving) -> Self {
        Self {
            method: agent.method.clone(),
            connections: agent.connections,
            streams_per_connection: agent.streams_per_connection,
            req_per_s_ratio: agent.req_per_s / floor.req_per_s,
            cpu_per_request_ratio: agent.server_cpu_us_per_request
                / floor.server_cpu_us_per_request,
            p50_ratio: agent.p50_us / floor.p50_us,
            p99_ratio: agent.p99_us / floor.p99_us,
            floor,
            agent,
        }
    }
}

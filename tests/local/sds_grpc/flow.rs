//! HTTP/2 flow control at the start of a connection, seen in raw frames.
//!
//! The agent's SETTINGS lower a stream's window (16 KiB) below the
//! protocol's default (64 KiB), which a client may use until it
//! acknowledges them. A stream whose first 16 KiB arrived, and were read by
//! the agent, before that acknowledgement must still be given window after
//! it: the client can send no more until it is (h2load's 10 Envoy-sized
//! streams per connection waited `SDS_FIRST_REQUEST_TIMEOUT` for it).

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use prost::Message;
use tokio::io::AsyncWriteExt;

use crate::support;
use support::attack::*;
use support::sds_client::*;

use super::local_agent;

const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;
const DATA: u8 = 0x0;
const END_STREAM: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// Reads frames until one matches `want`, for at most `within`.
async fn wait_for(
    socket: &mut tokio::net::UnixStream,
    within: Duration,
    want: impl Fn(&RawFrame) -> bool,
) -> Option<RawFrame> {
    tokio::time::timeout(within, async {
        loop {
            let f = read_frame(socket)
                .await
                .expect("the agent keeps the connection");
            if want(&f) {
                return f;
            }
        }
    })
    .await
    .ok()
}

#[tokio::test]
async fn data_read_before_the_settings_ack_is_given_window_after_it() {
    let agent = local_agent();
    let mut s = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    // An Envoy-sized request: 48 KiB of node.
    let mut req = request(&["default"], None);
    req.node = Some(Node {
        id: "x".repeat(48 * 1024),
        ..Default::default()
    });
    let msg = req.encode_to_vec();
    let mut body = vec![0u8];
    body.extend((msg.len() as u32).to_be_bytes());
    body.extend(msg);
    let first = 16 * 1024;

    // Preface, SETTINGS, the stream and its first 16 KiB, within the
    // default window; the agent's SETTINGS are not acknowledged yet.
    let mut out = h2_open_stream_bytes()[..24 + 9].to_vec();
    out.extend(h2_headers_with_jwt(1, &fake_jwt("default", "early-data")));
    out.extend(frame(DATA, 0, 1, &body[..first]));
    s.write_all(&out).await.unwrap();
    // The agent answers the stream's headers once it has admitted it; its
    // reader takes the 16 KiB meanwhile.
    wait_for(&mut s, Duration::from_secs(5), |f| {
        f.kind == 0x1 && f.stream == 1
    })
    .await
    .expect("response headers");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Now the acknowledgement: the stream's window shrinks to 16 KiB, all
    // of which the client has used. The agent must open it again.
    s.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
    let (mut sent, mut window) = (first, 0usize);
    while sent < body.len() {
        if window == 0 {
            let update = wait_for(&mut s, Duration::from_secs(2), |f| {
                f.kind == WINDOW_UPDATE && f.stream == 1
            })
            .await
            .unwrap_or_else(|| panic!("no window for the stream after {sent} bytes"));
            window += (u32::from_be_bytes(update.payload[..4].try_into().unwrap()) & 0x7fff_ffff)
                as usize;
            continue;
        }
        let n = window.min(first).min(body.len() - sent);
        let flags = if sent + n == body.len() {
            END_STREAM
        } else {
            0
        };
        s.write_all(&frame(DATA, flags, 1, &body[sent..sent + n]))
            .await
            .unwrap();
        sent += n;
        window -= n;
    }
    let answer = wait_for(&mut s, Duration::from_secs(5), |f| {
        f.kind == DATA && f.stream == 1
    })
    .await
    .expect("the stream is answered");
    assert!(answer.payload.len() > 500, "a certificate, not an error");
}

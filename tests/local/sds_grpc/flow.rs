//! HTTP/2 flow control of a stream's request, seen in raw frames: the
//! agent's stream window (16 KiB, below the protocol's default 64 KiB that a
//! client may use until it acknowledges the agent's SETTINGS), and the
//! window the agent lends for the rest of a message whose size it has
//! taken from the request budget.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use prost::Message;
use tokio::io::AsyncWriteExt;

use crate::support;
use support::attack::*;
use support::sds_client::*;

use super::local_agent;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
/// The agent's stream window, and the protocol's default.
const OWN: usize = 16 * 1024;
const DEFAULT: i64 = 65_535;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// The gRPC body of an Envoy-like request whose node holds `node` bytes.
fn request_body(node: usize) -> Vec<u8> {
    let mut req = request(&["default"], None);
    req.node = Some(Node {
        id: "x".repeat(node),
        ..Default::default()
    });
    let msg = req.encode_to_vec();
    let mut body = vec![0u8];
    body.extend((msg.len() as u32).to_be_bytes());
    body.extend(msg);
    body
}

/// A raw client of stream 1, keeping count of its send window as the agent
/// grants it.
struct Client {
    s: tokio::net::UnixStream,
    /// The stream's send window, as the client must keep it.
    window: i64,
    /// Every increment the agent granted stream 1.
    granted: i64,
}

impl Client {
    async fn open(agent: &support::agent::Agent) -> Self {
        let s = tokio::net::UnixStream::connect(&agent.socket)
            .await
            .unwrap();
        Self {
            s,
            window: DEFAULT,
            granted: 0,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Sends DATA on stream 1 within its window.
    async fn data(&mut self, bytes: &[u8], end: bool) {
        assert!(bytes.len() as i64 <= self.window, "within the window");
        self.window -= bytes.len() as i64;
        let f = frame(DATA, if end { END_STREAM } else { 0 }, 1, bytes);
        self.send(&f).await;
    }

    /// Reads frames until one matches `want`, for at most `within`,
    /// counting the window granted meanwhile.
    async fn wait_for(&mut self, within: Duration, want: impl Fn(&RawFrame) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let Ok(f) = tokio::time::timeout_at(deadline, read_frame(&mut self.s)).await else {
                return false;
            };
            let f = f.expect("the agent keeps the connection");
            if f.kind == WINDOW_UPDATE && f.stream == 1 {
                let inc = u32::from_be_bytes(f.payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                self.window += i64::from(inc);
                self.granted += i64::from(inc);
            }
            if want(&f) {
                return true;
            }
        }
    }

    /// Waits until the stream's window is open, for at most 2 s.
    async fn window_open(&mut self, what: &str) {
        if self.window <= 0 {
            let granted = self
                .wait_for(Duration::from_secs(2), |f| {
                    f.kind == WINDOW_UPDATE && f.stream == 1
                })
                .await;
            assert!(granted, "no window for the stream {what}");
        }
    }

    /// Sends `body` from `sent` on, as the window allows, then waits for
    /// the stream's answer, a certificate.
    async fn finish(&mut self, body: &[u8], mut sent: usize) {
        while sent < body.len() {
            self.window_open(&format!("after {sent} bytes")).await;
            let n = (self.window as usize).min(OWN).min(body.len() - sent);
            self.data(&body[sent..sent + n], sent + n == body.len())
                .await;
            sent += n;
        }
        let answered = self
            .wait_for(Duration::from_secs(5), |f| {
                f.kind == DATA && f.stream == 1 && f.payload.len() > 500
            })
            .await;
        assert!(answered, "the stream is answered with a certificate");
    }
}

/// A stream whose first 16 KiB arrived, and were read, before the client
/// acknowledged the agent's SETTINGS is still given window after the
/// acknowledgement shrank it (h2load's 10 Envoy-sized streams per connection
/// waited `SDS_FIRST_REQUEST_TIMEOUT` for it).
#[tokio::test]
async fn data_read_before_the_settings_ack_is_given_window_after_it() {
    let agent = local_agent();
    let mut c = Client::open(&agent).await;
    // Less than a window to come after the first 16 KiB, so that no window
    // is lent for it: only the acknowledgement's update can open it.
    let body = request_body(28 * 1024);
    assert!(body.len() - OWN < OWN);
    // Preface, SETTINGS, the stream and its first 16 KiB, within the
    // default window; the agent's SETTINGS are not acknowledged yet.
    let mut out = h2_open_stream_bytes()[..24 + 9].to_vec();
    out.extend(h2_headers_with_jwt(1, &fake_jwt("default", "early-data")));
    c.send(&out).await;
    c.data(&body[..OWN], false).await;
    // The agent answers the stream's headers once it has admitted it; its
    // reader takes the 16 KiB meanwhile.
    assert!(
        c.wait_for(Duration::from_secs(5), |f| f.kind == HEADERS
            && f.stream == 1)
            .await
    );
    c.wait_for(Duration::from_millis(200), |_| false).await;
    // Now the acknowledgement: the stream's window shrinks by the
    // difference. The agent must still open it for the rest.
    c.send(&frame(SETTINGS, 0x1, 0, &[])).await;
    c.window += OWN as i64 - DEFAULT;
    c.finish(&body, OWN).await;
}

/// Once a message's header says how large it is, the agent lends the stream
/// window for the rest of it: an Envoy-sized request arrives after one
/// window update, not one per 16 KiB. The loan is the message's own bytes:
/// once they are read, the client's window is the stream's 16 KiB again.
#[tokio::test]
async fn the_rest_of_a_budgeted_message_is_lent_window_and_no_more() {
    let agent = local_agent();
    let mut c = Client::open(&agent).await;
    let body = request_body(60 * 1024);
    // The agent's SETTINGS acknowledged first: the stream's window is its
    // 16 KiB from the start.
    let mut out = h2_open_stream_bytes()[..24 + 9].to_vec();
    out.extend(frame(SETTINGS, 0x1, 0, &[]));
    out.extend(h2_headers_with_jwt(1, &fake_jwt("default", "lent-window")));
    c.send(&out).await;
    c.window = OWN as i64;
    c.data(&body[..OWN], false).await;

    // Window for all the rest, without sending anything more.
    let rest = (body.len() - OWN) as i64;
    while c.window < rest {
        let got = c
            .wait_for(Duration::from_secs(2), |f| {
                f.kind == WINDOW_UPDATE && f.stream == 1
            })
            .await;
        assert!(got, "window for {} of the {rest} bytes to come", c.window);
    }
    assert_eq!(c.window, rest, "the rest of the message, and no more");
    // All of it at once, the stream left open; then the answer.
    let mut sent = OWN;
    while sent < body.len() {
        let n = OWN.min(body.len() - sent);
        c.data(&body[sent..sent + n], false).await;
        sent += n;
    }
    assert!(
        c.wait_for(Duration::from_secs(5), |f| f.kind == DATA
            && f.stream == 1
            && f.payload.len() > 500)
            .await,
        "the stream is answered with a certificate"
    );
    // Once the agent has read it, the window is the stream's own again.
    c.wait_for(Duration::from_millis(300), |_| false).await;
    assert_eq!(c.window, OWN as i64, "the lent window was used once");
    assert_eq!(c.granted, body.len() as i64);
}

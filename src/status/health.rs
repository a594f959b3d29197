//! Readiness: is the SDS socket serving? Asked of the socket itself at each
//! probe, by the same HTTP/2 handshake Envoy starts with, so that the answer
//! is the agent's real ability to serve and nothing else. The CA plays no
//! part: a Vault outage leaves cached certificates served, so it must not
//! make every pod of a node unready.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long the SDS server has to answer the handshake.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the probe waits for the server to close after its GOAWAY.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

/// The HTTP/2 client connection preface, then an empty SETTINGS frame
/// (length 0, type 4, no flags, stream 0), RFC 9113 §3.4 and §6.5.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
const FRAME_SETTINGS: u8 = 0x4;
/// GOAWAY (type 7, length 8) for stream 0 with NO_ERROR: the probe is done,
/// so that the server closes the connection as a normal one (§6.8).
const GOAWAY: &[u8] = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

/// Connects to the SDS socket at `path` and checks that an HTTP/2 server
/// answers with its SETTINGS. `Err` says why not, for the 503 body.
pub async fn probe_sds(path: &Path) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT + CLOSE_WAIT, handshake(path)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the SDS socket {} accepted a connection but its server did not answer within {PROBE_TIMEOUT:?}",
            path.display()
        )),
    }
}

async fn handshake(path: &Path) -> Result<(), String> {
    let mut s = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "the SDS socket {} is not serving: cannot connect: {e}",
            path.display()
        )
    })?;
    let broken = |e: std::io::Error| {
        format!(
            "the SDS socket {} accepted a connection but the HTTP/2 handshake failed: {e}",
            path.display()
        )
    };
    s.write_all(PREFACE).await.map_err(broken)?;
    // The server's first frame must be its SETTINGS (RFC 9113 §3.4).
    let mut header = [0u8; 9];
    s.read_exact(&mut header).await.map_err(broken)?;
    if header[3] != FRAME_SETTINGS {
        return Err(format!(
            "the SDS socket {} answered with HTTP/2 frame type {} instead of SETTINGS",
            path.display(),
            header[3]
        ));
    }
    // Say goodbye and read until the server closes, so that neither side
    // resets the connection (which the server would log).
    s.write_all(GOAWAY).await.map_err(broken)?;
    // The answer is already known: a server slow to close does not change it.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(CLOSE_WAIT, s.read_to_end(&mut rest)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_for_a_grpc_server_and_says_why_not_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let e = probe_sds(&path).await.unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");

        // A listener nobody serves: the connection is accepted by the kernel,
        // but no HTTP/2 server answers.
        let silent = tokio::net::UnixListener::bind(&path).unwrap();
        let e = probe_sds(&path).await.unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
        drop(silent);
        std::fs::remove_file(&path).unwrap();

        // A real tonic server (the same stack the SDS server runs on).
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        probe_sds(&path).await.expect("a gRPC server answers");
        server.abort();
    }
}

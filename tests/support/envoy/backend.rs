//! The upstream behind the server Envoy: a tiny HTTP/1.1 server answering
//! every request with 200 and a fixed body, with keep-alive since Envoy
//! pools its upstream connections.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Tiny HTTP/1.1 server on a loopback port the kernel picks (so that no other
/// process can hold it), answering every request with `200` and `body`.
/// Supports keep-alive (Envoy pools upstream connections). Returns its port
/// and the task; abort the task to stop accepting.
pub async fn start_backend(body: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap_or_else(|e| panic!("backend bind 127.0.0.1:0: {e}"));
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_backend_conn(stream, body));
        }
    });
    (port, task)
}

async fn serve_backend_conn(mut stream: TcpStream, body: &'static str) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read until the end of the request head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
        };
        let content_length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Chunked request bodies are not parsed; answer and close instead.
        let close = header("connection").as_deref() == Some("close")
            || header("transfer-encoding").is_some()
            || head.starts_with("get / http/1.0") && header("connection").is_none();

        // Discard the request body.
        while buf.len() < head_end + content_length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + content_length);

        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n{}",
            body.len(),
            if close { "close" } else { "keep-alive" },
            body
        );
        if stream.write_all(resp.as_bytes()).await.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

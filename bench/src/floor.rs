//! The floor next to the agent: node-agent's answers captured (one call of
//! each method with the body h2load sends), the floor process started with
//! them (`floor_server`), and checked to answer those calls with the same
//! bytes, byte for byte, before anything is measured.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use prost::bytes::Bytes;
use tonic::codegen::http::uri::PathAndQuery;

use crate::floor_server::{self, Answers, RawCodec};
use crate::h2load::{self, DELTA, FETCH, STREAM};
use node_agent::client::sds as sds_client;

/// The request bodies h2load sends (gRPC-framed files, see
/// [`h2load::write_body`]), one per method.
pub struct Bodies {
    pub fetch: PathBuf,
    pub stream: PathBuf,
    pub delta: PathBuf,
}

impl Bodies {
    fn for_path(&self, path: &str) -> &Path {
        match path {
            FETCH => &self.fetch,
            STREAM => &self.stream,
            _ => &self.delta,
        }
    }
}

fn method(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// One call of `path` on the server at `socket`, as h2load makes it (the
/// message, then the end of the request stream, with the JWT): the bytes
/// of the first response message.
pub async fn ask(
    socket: &Path,
    path: &'static str,
    message: Bytes,
    jwt: &str,
) -> anyhow::Result<Bytes> {
    let channel = sds_client::channel(socket).await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let route = PathAndQuery::from_static(path);
    let answer = if path == FETCH {
        grpc.unary(sds_client::with_jwt(message, jwt), route, RawCodec)
            .await?
            .into_inner()
    } else {
        let requests = tokio_stream::once(message);
        grpc.streaming(sds_client::with_jwt(requests, jwt), route, RawCodec)
            .await?
            .into_inner()
            .message()
            .await?
            .with_context(|| format!("{} ended without a response", method(path)))?
    };
    Ok(answer)
}

/// What the server at `socket` answers each method's call with.
pub async fn capture(socket: &Path, bodies: &Bodies, jwt: &str) -> anyhow::Result<Answers> {
    let mut got = Vec::new();
    for path in [FETCH, STREAM, DELTA] {
        let message = h2load::read_message(bodies.for_path(path))?;
        got.push(
            ask(socket, path, message, jwt)
                .await
                .with_context(|| format!("capture node-agent's answer to {}", method(path)))?,
        );
    }
    let [fetch, stream, delta] = <[Bytes; 3]>::try_from(got).expect("three methods");
    Ok(Answers {
        fetch,
        stream,
        delta,
    })
}

/// Fails unless the floor at `socket` answers each method's call with
/// `expected`, byte for byte.
pub async fn verify(
    socket: &Path,
    bodies: &Bodies,
    jwt: &str,
    expected: &Answers,
) -> anyhow::Result<()> {
    for path in [FETCH, STREAM, DELTA] {
        let message = h2load::read_message(bodies.for_path(path))?;
        let got = ask(socket, path, message, jwt)
            .await
            .with_context(|| format!("ask the floor {}", method(path)))?;
        let want = expected.for_path(path).expect("a method of the floor");
        if got != want {
            let at = got
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            bail!(
                "the floor answers {} with {} bytes, node-agent answered {} bytes; they differ from byte {at}",
                method(path),
                got.len(),
                want.len()
            );
        }
    }
    Ok(())
}

/// The floor process (this binary, `--floor-server DIR`); killed on drop.
pub struct FloorProc {
    child: Child,
    pub socket: PathBuf,
}

impl FloorProc {
    /// Writes `answers` into `dir`, starts the floor on them and waits until
    /// its socket accepts connections.
    pub async fn start(dir: &Path, answers: &Answers) -> anyhow::Result<Self> {
        answers.write(dir)?;
        let socket = floor_server::socket(dir);
        let _ = std::fs::remove_file(&socket);
        let exe = std::env::current_exe().context("this binary's path")?;
        let log = std::fs::File::create(dir.join("floor.log"))?;
        let mut child = Command::new(exe)
            .arg("--floor-server")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start the floor")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "the floor exited ({st}): {}",
                    std::fs::read_to_string(dir.join("floor.log")).unwrap_or_default()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the floor did not listen within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(Self { child, socket })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the floor has died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("the floor exited ({st})");
        }
        Ok(())
    }
}

impl Drop for FloorProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(stream: &[u8]) -> Answers {
        Answers {
            fetch: Bytes::from_static(b"fetch answer"),
            stream: Bytes::copy_from_slice(stream),
            delta: Bytes::from_static(b"delta answer"),
        }
    }

    /// The byte check passes on the floor's own answers and catches one
    /// byte changed, a byte missing and an answer served on the wrong method.
    #[tokio::test]
    async fn verify_catches_answers_that_are_not_the_agents() {
        let dir = tempfile::tempdir().unwrap();
        let bodies = Bodies {
            fetch: dir.path().join("f.bin"),
            stream: dir.path().join("s.bin"),
            delta: dir.path().join("d.bin"),
        };
        for (p, n) in [
            (&bodies.fetch, 3),
            (&bodies.stream, 70_000),
            (&bodies.delta, 5),
        ] {
            h2load::write_body(
                p,
                envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
                    version_info: "x".repeat(n),
                    ..Default::default()
                },
            )
            .unwrap();
        }
        let served = answers(b"stream answer");
        let socket = floor_server::socket(dir.path());
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(floor_server::serve(listener, served.clone(), async {
            let _ = stopped.await;
        }));
        verify(&socket, &bodies, "jwt", &served).await.unwrap();
        for (wrong, what) in [
            (answers(b"stream answeR"), "a byte changed"),
            (answers(b"stream answe"), "a byte missing"),
            (
                Answers {
                    fetch: served.stream.clone(),
                    stream: served.fetch.clone(),
                    delta: served.delta.clone(),
                },
                "answers swapped",
            ),
        ] {
            let err = verify(&socket, &bodies, "jwt", &wrong)
                .await
                .expect_err(what)
                .to_string();
            assert!(err.contains("node-agent answered"), "{what}: {err}");
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}

//! [`ToggleProxy`]: a loopback TCP proxy in front of OpenBao that forwards,
//! refuses or black-holes connections, so that a test can take Vault away and
//! bring it back without losing the dev server's in-memory state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Proxy state, see [`ToggleProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward connections to the target.
    Up,
    /// Listener closed (connect gets ECONNREFUSED); open connections cut.
    Down,
    /// Accept connections but never answer (a black hole, for timeouts);
    /// open connections are cut.
    Hang,
}

/// A loopback TCP proxy that can refuse, black-hole or forward connections,
/// to simulate Vault being down without losing dev-mode state. TLS passes
/// through untouched; the dev-tls certificate is valid for 127.0.0.1 on any
/// port.
pub struct ToggleProxy {
    addr: SocketAddr,
    mode: watch::Sender<(u64, ProxyMode)>,
    applied: watch::Receiver<u64>,
    connections: Arc<AtomicU64>,
    /// Connections held in `Hang` mode on which the client began a request.
    hung: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl ToggleProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `target`;
    /// returns once `mode` is in effect.
    pub async fn start(target: SocketAddr, mode: ProxyMode) -> anyhow::Result<Self> {
        let port = super::super::ports::free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let (tx, rx) = watch::channel((0, mode));
        let (applied_tx, applied) = watch::channel(u64::MAX);
        let connections = Arc::new(AtomicU64::new(0));
        let hung = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run_proxy(
            addr,
            target,
            rx,
            applied_tx,
            connections.clone(),
            hung.clone(),
        ));
        let proxy = Self {
            addr,
            mode: tx,
            applied,
            connections,
            hung,
            task,
        };
        proxy.wait_applied(0).await?;
        Ok(proxy)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`, to give the agent as Vault address.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Switches mode; returns once the listener is bound or closed, so the
    /// next connect already sees the new mode. Open connections are cut
    /// asynchronously, within milliseconds.
    pub async fn set_mode(&self, mode: ProxyMode) {
        let mut generation = 0;
        self.mode.send_modify(|(g, m)| {
            *g += 1;
            *m = mode;
            generation = *g;
        });
        let _ = self.wait_applied(generation).await;
    }

    /// `true` forwards; `false` refuses new and cuts existing connections.
    pub async fn set_up(&self, up: bool) {
        self.set_mode(if up { ProxyMode::Up } else { ProxyMode::Down })
            .await;
    }

    async fn wait_applied(&self, generation: u64) -> anyhow::Result<()> {
        let mut rx = self.applied.clone();
        let done = rx.wait_for(|g| *g != u64::MAX && *g >= generation);
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(5), done).await,
            Ok(Ok(_))
        );
        if !ok {
            bail!("proxy could not apply its mode (port taken?)");
        }
        Ok(())
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests left hanging so far: connections accepted in `Hang` mode on
    /// which the client sent its first bytes (for TLS, its ClientHello) and
    /// got no answer.
    pub fn hung_requests(&self) -> u64 {
        self.hung.load(Ordering::SeqCst)
    }
}

impl Drop for ToggleProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    // Lets the port be re-bound at once after going Down -> Up.
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(128)
}

async fn run_proxy(
    addr: SocketAddr,
    target: SocketAddr,
    mut rx: watch::Receiver<(u64, ProxyMode)>,
    applied: watch::Sender<u64>,
    connections: Arc<AtomicU64>,
    hung: Arc<AtomicU64>,
) {
    let mut listener = None;
    loop {
        let (generation, mode) = *rx.borrow_and_update();
        if mode == ProxyMode::Down {
            listener = None;
        } else if listener.is_none() {
            match bind(addr) {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        applied.send_replace(generation);
        let Some(l) = &listener else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            accepted = l.accept() => {
                let Ok((inbound, _)) = accepted else { continue };
                let rx = rx.clone();
                if mode == ProxyMode::Up {
                    connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(forward(inbound, target, rx));
                } else {
                    tokio::spawn(hold(inbound, rx, hung.clone()));
                }
            }
        }
    }
}

/// Copies both ways until either side closes or the mode leaves `Up`.
async fn forward(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut rx: watch::Receiver<(u64, ProxyMode)>,
) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = rx.wait_for(|(_, m)| *m != ProxyMode::Up) => {}
    }
}

/// Keeps a connection open, silent, until the mode leaves `Hang`; counts it
/// in `hung` once the client has sent something.
async fn hold(
    mut inbound: TcpStream,
    mut rx: watch::Receiver<(u64, ProxyMode)>,
    hung: Arc<AtomicU64>,
) {
    use tokio::io::AsyncReadExt;
    let mut counted = false;
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            _ = rx.wait_for(|(_, m)| *m != ProxyMode::Hang) => return,
            n = inbound.read(&mut buf) => match n {
                Ok(n) if n > 0 => {
                    if !counted {
                        counted = true;
                        hung.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // Closed by the client: nothing more to hold.
                _ => return,
            },
        }
    }
}

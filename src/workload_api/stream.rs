//! One open `FetchX509SVID` or `FetchX509Bundles` stream: its request is
//! read (within the first-request deadline), the workload's token file is
//! proven to the CA under the connection's login budget, and a message is
//! sent now and again whenever what it carries changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::server::WorkloadApiService;
use super::x509::{self, Build, Snapshot};
use crate::metrics::{self, Refusal};
use crate::sds::connection::Connection;
use crate::sds::credential::CredentialSource;
use crate::sds::framing::RequestReader;
use crate::sds::limits::more;
use crate::sds::server::status_for;
use crate::sds::serving::{
    expired_status, next_event, shutting_down, token_file_update, CredentialDue, Current, Event,
};

/// Which X.509 method a stream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Svid,
    Bundles,
}

impl Kind {
    fn method(self) -> &'static str {
        match self {
            Kind::Svid => "FetchX509SVID",
            Kind::Bundles => "FetchX509Bundles",
        }
    }

    /// Changes whenever what the method sends does.
    fn version(self, snap: &Snapshot<'_>) -> String {
        match self {
            Kind::Svid => x509::svid_version(snap),
            Kind::Bundles => x509::bundles_version(snap),
        }
    }
}

/// One open stream of either X.509 method.
pub(super) struct ApiStream<T> {
    pub id: u64,
    pub kind: Kind,
    pub service: Arc<WorkloadApiService>,
    pub conn: Arc<Connection>,
    pub out: mpsc::Sender<Result<T, Status>>,
    pub shutdown: watch::Receiver<bool>,
}

impl<T> ApiStream<T> {
    /// Serves the stream until the client leaves, it fails, or shutdown.
    pub async fn run<Req: Message + Default>(
        mut self,
        mut reader: RequestReader,
        token_path: PathBuf,
        build: Build<T>,
    ) {
        let request = tokio::select! {
            r = reader.message::<Req>() => r,
            _ = self.out.closed() => return,
            _ = shutting_down(&mut self.shutdown) => return,
        };
        drop(reader);
        match request {
            Ok(Some(_)) => {}
            Ok(None) => {
                let status = Status::invalid_argument(format!(
                    "{} carries one request message; none came",
                    self.kind.method()
                ));
                return self.fail(status).await;
            }
            Err(status) => {
                self.service
                    .limits
                    .inbound_error(self.id, &self.conn, &status);
                return self.fail(status).await;
            }
        }
        let Some(current) = self.subscribe(&token_path).await else {
            return;
        };
        self.serve(current, &token_path, build).await;
        tracing::debug!(
            stream = self.id,
            method = self.kind.method(),
            "Workload API stream done"
        );
    }

    /// Proves the workload's token to the CA (under the connection's login
    /// budget) and subscribes to its identity; `None` when refused (the
    /// status is sent) or the client left.
    async fn subscribe(&mut self, token_path: &Path) -> Option<Current> {
        let method = self.kind.method();
        let credential = match CredentialSource::TokenFile(token_path.to_path_buf()).get() {
            Ok(c) => c,
            Err(status) => {
                metrics::refused(Refusal::Credential);
                if let Some(n) = self.service.limits.throttle("Workload API: credential") {
                    tracing::warn!(
                        stream = self.id,
                        "refusing Workload API {method}: {}{}",
                        status.message(),
                        more(n)
                    );
                }
                self.fail(status).await;
                return None;
            }
        };
        let limits = self.service.limits.clone();
        let refused = |e: crate::secrets::SecretError| {
            let what = format!("Workload API {method} failed: {e}");
            limits.log_refusal(self.id, &what, &e);
            Status::new(status_for(&e).code(), what)
        };
        let admission = match self.conn.admit(&credential) {
            Ok(a) => a,
            Err(e) => {
                let status = refused(e);
                self.fail(status).await;
                return None;
            }
        };
        let manager = self.service.manager.clone();
        let result = tokio::select! {
            r = manager.subscribe(&credential) => r.map(|sub| Current::new(credential.clone(), sub)),
            _ = self.out.closed() => return None,
            _ = shutting_down(&mut self.shutdown) => return None,
        };
        drop(admission);
        match result {
            Ok(sub) => Some(sub),
            Err(e) => {
                let status = refused(e);
                self.fail(status).await;
                None
            }
        }
    }

    /// Sends `build(state)` now and whenever its version changes. The
    /// subscription is held as long as the stream lives, and moves to the
    /// token file's new token before the old one expires; the stream ends
    /// when its token expires unreplaced or the CA rejects it.
    async fn serve(&mut self, current: Current, token_path: &Path, build: Build<T>) {
        let source = CredentialSource::TokenFile(token_path.to_path_buf());
        let mut current = Some(current);
        tracing::debug!(stream = self.id, identity = %current.as_ref().map(|c| c.sub.identity.as_str()).unwrap_or_default(), method = self.kind.method(), "Workload API stream opened");
        let mut sent: Option<String> = None;
        loop {
            let Some(c) = current.as_mut() else { return };
            if let Some(status) = c.rejection() {
                self.service.limits.credential_ended(self.id, &status);
                self.fail(status).await;
                return;
            }
            let sub = &mut c.sub;
            let state = sub.secret.borrow_and_update().clone();
            if let Some(reason) = state.closed {
                self.fail(Status::unavailable(reason)).await;
                return;
            }
            if let Some(secret) = &state.secret {
                let snap = Snapshot {
                    secret,
                    roots: &state.roots,
                };
                let v = self.kind.version(&snap);
                if sent.as_ref() != Some(&v) {
                    if self.kind == Kind::Svid {
                        if let Some(problem) = x509::svid_problem(&snap) {
                            tracing::warn!(
                                stream = self.id,
                                identity = %sub.identity,
                                serial = %secret.leaf.serial_hex,
                                "Workload API: the certificate is not a valid X509-SVID and SPIFFE clients will refuse it: {problem}"
                            );
                        }
                    }
                    let msg = build(&snap);
                    let failed = msg.is_err();
                    match &msg {
                        Err(s) => {
                            tracing::error!(stream = self.id, identity = %sub.identity, "Workload API {}: {}", self.kind.method(), s.message())
                        }
                        Ok(_) => tracing::info!(
                            stream = self.id,
                            identity = %sub.identity,
                            serial = %secret.leaf.serial_hex,
                            roots = state.roots.pems.len(),
                            "Workload API: {} sent",
                            self.kind.method()
                        ),
                    }
                    if self.out.send(msg).await.is_err() || failed {
                        return;
                    }
                    sent = Some(v);
                }
            }
            let event = tokio::select! {
                e = next_event(&mut current, true) => e,
                _ = self.out.closed() => return,
                _ = shutting_down(&mut self.shutdown) => {
                    self.fail(Status::unavailable("node-agent is shutting down")).await;
                    return;
                }
            };
            match event {
                Event::Changed => {}
                Event::Dropped => return,
                Event::Credential(CredentialDue::Expired(exp)) => {
                    let status = expired_status(exp, &source);
                    self.service.limits.credential_ended(self.id, &status);
                    self.fail(status).await;
                    return;
                }
                Event::Credential(CredentialDue::Refresh) => {
                    if token_file_update(&current, &source).is_some() {
                        // The new token is proven, then served from; the
                        // old subscription goes when the new one is held.
                        match self.subscribe(token_path).await {
                            Some(next) => current = Some(next),
                            None => return,
                        }
                    }
                }
            }
        }
    }

    async fn fail(&mut self, status: Status) {
        let _ = self.out.send(Err(status)).await;
    }
}

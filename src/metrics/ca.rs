//! [`MeteredCa`]: counts and times the requests any [`CaClient`] sends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{CaKind, CaOutcome, Metrics};
use crate::ca::{Authorization, CaClient, CaError};
use crate::crypto::IssuedChain;
use crate::identity::Credential;

/// A [`CaClient`] that records every request it passes on in
/// `node_agent_ca_requests_total` and `node_agent_ca_request_duration_seconds`.
///
/// - A login answered from the provider's cache is not a CA request, and is
///   not counted: the wrapper asks [`CaClient::cached_login`] first.
/// - A rejection answered from memory ([`CaError::RecentlyRejected`]) did
///   not reach the CA either, and is not counted.
///
/// It forwards every method of the trait. A method added to [`CaClient`]
/// with a default body must be forwarded here too, or the wrapped
/// provider's own version would never be called.
pub struct MeteredCa {
    inner: Arc<dyn CaClient>,
    metrics: &'static Metrics,
}

impl MeteredCa {
    /// Wraps `inner`, recording into the process's metrics.
    pub fn wrap(inner: Arc<dyn CaClient>) -> Arc<dyn CaClient> {
        Arc::new(Self::with_metrics(inner, super::global()))
    }

    /// Wraps `inner`, recording into `metrics`.
    pub fn with_metrics(inner: Arc<dyn CaClient>, metrics: &'static Metrics) -> Self {
        Self { inner, metrics }
    }

    fn record<T>(&self, kind: CaKind, started: Instant, result: &Result<T, CaError>) {
        if let Some(outcome) = CaOutcome::of(result) {
            self.metrics.ca_request(kind, outcome, started.elapsed());
        }
    }
}

#[async_trait]
impl CaClient for MeteredCa {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn login(&self, credential: &Credential) -> Result<Authorization, CaError> {
        if let Some(auth) = self.inner.cached_login(credential).await {
            return Ok(auth);
        }
        let started = Instant::now();
        let result = self.inner.login(credential).await;
        self.record(CaKind::Login, started, &result);
        result
    }

    async fn cached_login(&self, credential: &Credential) -> Option<Authorization> {
        self.inner.cached_login(credential).await
    }

    async fn sign(
        &self,
        auth: &Authorization,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedChain, CaError> {
        let started = Instant::now();
        let result = self.inner.sign(auth, csr_pem, ttl).await;
        self.record(CaKind::Sign, started, &result);
        result
    }

    async fn trust_roots(&self) -> Result<Vec<String>, CaError> {
        let started = Instant::now();
        let result = self.inner.trust_roots().await;
        self.record(CaKind::Roots, started, &result);
        result
    }

    fn invalidate(&self, auth: &Authorization) {
        self.inner.invalidate(auth)
    }

    async fn release(&self, credential: &Credential) {
        self.inner.release(credential).await
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::LazyLock;

    /// Logs in once per process (then answers from its cache), rejects the
    /// credential `bad`, and fails every sign.
    #[derive(Default)]
    struct Fake {
        logins: AtomicUsize,
    }

    #[async_trait]
    impl CaClient for Fake {
        fn describe(&self) -> String {
            "fake".into()
        }
        async fn login(&self, c: &Credential) -> Result<Authorization, CaError> {
            if c.expose() == "bad" {
                return Err(CaError::Rejected("no".into()));
            }
            if self.logins.fetch_add(1, Ordering::SeqCst) > 0 {
                return Err(CaError::RecentlyRejected("should have been cached".into()));
            }
            Ok(Authorization::default())
        }
        async fn cached_login(&self, c: &Credential) -> Option<Authorization> {
            (c.expose() != "bad" && self.logins.load(Ordering::SeqCst) > 0)
                .then(Authorization::default)
        }
        async fn sign(
            &self,
            _: &Authorization,
            _: &str,
            _: Duration,
        ) -> Result<IssuedChain, CaError> {
            Err(CaError::Unavailable("down".into()))
        }
        async fn trust_roots(&self) -> Result<Vec<String>, CaError> {
            Err(CaError::BadAnswer("garbage".into()))
        }
        fn invalidate(&self, _: &Authorization) {}
        async fn release(&self, _: &Credential) {}
        async fn shutdown(&self) {}
    }

    #[tokio::test]
    async fn counts_what_reaches_the_ca() {
        static M: LazyLock<Metrics> = LazyLock::new(Metrics::new);
        let ca = MeteredCa::with_metrics(Arc::new(Fake::default()), &M);
        let good = Credential::new("good");
        ca.login(&good).await.unwrap();
        ca.login(&good).await.expect("answered from the cache");
        assert!(ca.login(&Credential::new("bad")).await.is_err());
        assert!(ca
            .sign(&Authorization::default(), "csr", Duration::from_secs(1))
            .await
            .is_err());
        assert!(ca.trust_roots().await.is_err());
        let text = M.encode(super::super::Format::Prometheus);
        for (labels, n) in [
            ("kind=\"login\",outcome=\"ok\"", 1),
            ("kind=\"login\",outcome=\"rejected\"", 1),
            ("kind=\"sign\",outcome=\"unavailable\"", 1),
            ("kind=\"roots\",outcome=\"bad_answer\"", 1),
            ("kind=\"sign\",outcome=\"ok\"", 0),
        ] {
            let line = format!("node_agent_ca_requests_total{{{labels}}} {n}\n");
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains(
            "node_agent_ca_request_duration_seconds_count{kind=\"login\",outcome=\"ok\"} 1"
        ));
    }
}

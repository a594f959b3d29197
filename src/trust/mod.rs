//! The trust bundle served as `ROOTCA`: the mesh's trust, not this node's.
//!
//! Agents on different nodes renew at different times, so during a root
//! rotation some peers present certificates from the new root while others
//! still present the old one. Every agent must therefore trust what the CA
//! trusts, not only the roots of its own certificates. The bundle is the union of:
//!
//! - every root the CA lists ([`CaClient::trust_roots`]), re-read every
//!   `TRUST_REFRESH_INTERVAL`, and at once when an issued chain ends in a root
//!   the bundle does not hold;
//! - the root at the top of every chain this agent was issued and still uses;
//! - the roots in the `TRUST_EXTRA_ROOTS` file, re-read when it changes.
//!
//! Removal: a root that has left every source stays served for the longer of
//! `TRUST_ROOT_RETENTION` and the longest certificate lifetime this agent has
//! seen, because peers may still present certificates that chain to it. An
//! expired root leaves at once. A root removed from the extra-roots file is
//! an operator's decision and leaves at once too. Every addition and removal
//! is logged with the root's subject, serial and expiry.
//!
//! A CA that cannot be read keeps the last good bundle: its roots are not
//! "gone" because the CA did not answer. An empty bundle is never published
//! after a non-empty one.
//!
//! The secret manager only consumes this module: it registers the roots of
//! each certificate it installs ([`TrustBundle::hold`]) and forwards the
//! bundle ([`TrustBundle::subscribe`]) to the streams.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::ca::queue::{CaQueue, Priority};
use crate::ca::CaClient;
use crate::clock::{rfc3339, Clock};
use crate::metrics::{self, TrustRefresh};

pub mod bundle;
mod extra;
pub mod federation;
mod in_use;
mod refresh;
pub mod spiffe_bundle;

pub use bundle::{Federated, RootBundle, RootCert};
use extra::ExtraRoots;
pub use extra::ExtraRootsError;
pub use in_use::RootsInUse;

/// The current bundle; streams serving `ROOTCA` watch it.
pub type RootsWatch = watch::Receiver<Arc<RootBundle>>;

pub use refresh::EXTRA_ROOTS_CHECK;

/// How the bundle behaves (see the module documentation).
#[derive(Debug, Clone)]
pub struct TrustOptions {
    /// `TRUST_REFRESH_INTERVAL`: how often the CA's roots are read.
    pub refresh: Duration,
    /// `TRUST_ROOT_RETENTION`: least time a root that left the CA stays served.
    pub retention: Duration,
    /// `TRUST_EXTRA_ROOTS`: a PEM file of extra roots.
    pub extra_roots: Option<PathBuf>,
    pub clock: Clock,
    /// The CA queue (`CA_MAX_CONCURRENCY`) reads of the CA's roots wait in,
    /// behind first fetches: the one the secret manager's requests wait in.
    /// `None`: the reads are not queued.
    pub queue: Option<CaQueue>,
}

impl Default for TrustOptions {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(300),
            retention: Duration::from_secs(24 * 3600),
            extra_roots: None,
            clock: Clock::system(),
            queue: None,
        }
    }
}

/// See the module documentation.
pub struct TrustBundle {
    ca: Arc<dyn CaClient>,
    opts: TrustOptions,
    state: Mutex<State>,
    tx: watch::Sender<Arc<RootBundle>>,
    /// Wakes the refresh task: a refresh is asked for, or a root left use
    /// (its removal time must be armed).
    wake: Arc<Notify>,
    refresh_asked: AtomicBool,
}

#[derive(Default)]
struct State {
    roots: HashMap<[u8; 32], Known>,
    /// The CA's roots have been read at least once.
    ca_read: bool,
    /// The longest lifetime of a certificate issued to this agent.
    longest_lifetime: Duration,
    extra: Option<ExtraRoots>,
    /// The last extra-roots error logged (not logged again while it repeats).
    extra_error: Option<ExtraRootsError>,
}

/// A root the bundle knows, and why.
struct Known {
    cert: RootCert,
    in_ca: bool,
    in_extra: bool,
    /// Certificates in use that chain to it.
    in_use: usize,
    /// When it left its last source.
    absent_since: Option<SystemTime>,
    /// It was once listed by the CA or in use: peers may present
    /// certificates chaining to it, so it leaves only after the window. A
    /// root that only ever came from the extra-roots file leaves at once.
    retained: bool,
    served: bool,
}

impl Known {
    fn new(cert: RootCert) -> Self {
        Self {
            cert,
            in_ca: false,
            in_extra: false,
            in_use: 0,
            absent_since: None,
            retained: false,
            served: false,
        }
    }

    fn present(&self) -> bool {
        self.in_ca || self.in_extra || self.in_use > 0
    }

    /// When it leaves the bundle, having left its sources (`None` while it
    /// has one).
    fn leaves_at(&self, window: Duration) -> Option<SystemTime> {
        let since = self.absent_since?;
        Some(if self.retained { since + window } else { since })
    }

    fn source(&self) -> &'static str {
        if self.in_ca {
            "listed by the CA"
        } else if self.in_extra {
            "in TRUST_EXTRA_ROOTS"
        } else {
            "at the top of a chain issued to this agent"
        }
    }
}

impl TrustBundle {
    /// Reads the extra-roots file (an error stops the agent at start) and
    /// starts the task that reads the CA's roots, at once and then
    /// periodically.
    pub fn start(ca: Arc<dyn CaClient>, opts: TrustOptions) -> Result<Arc<Self>, ExtraRootsError> {
        let mut state = State::default();
        if let Some(path) = &opts.extra_roots {
            let mut extra = ExtraRoots::new(path.clone());
            let roots = extra.read_if_changed()?.unwrap_or_default();
            for cert in roots {
                state
                    .roots
                    .entry(cert.id)
                    .or_insert_with(|| Known::new(cert))
                    .in_extra = true;
            }
            state.extra = Some(extra);
        }
        let trust = Arc::new(Self {
            ca,
            opts,
            state: Mutex::new(state),
            tx: watch::channel(Arc::new(RootBundle::default())).0,
            wake: Arc::new(Notify::new()),
            refresh_asked: AtomicBool::new(false),
        });
        trust.recompute(&mut trust.lock());
        tokio::spawn(refresh::run(Arc::downgrade(&trust), trust.wake.clone()));
        Ok(trust)
    }

    /// A watch on the bundle.
    pub fn subscribe(&self) -> RootsWatch {
        self.tx.subscribe()
    }

    /// The bundle now.
    pub fn current(&self) -> Arc<RootBundle> {
        self.tx.borrow().clone()
    }

    /// Publishes the federated trust domains' roots beside this mesh's; the
    /// streams that serve them (`ALL`, the Workload API) push the change,
    /// `ROOTCA` streams do not (its content is unchanged).
    pub fn set_federated(&self, federated: Arc<Federated>) {
        self.tx.send_if_modified(|cur| {
            if cur.federated == federated {
                return false;
            }
            *cur = Arc::new(RootBundle {
                pems: cur.pems.clone(),
                generation: cur.generation + 1,
                federated,
                memo: Default::default(),
            });
            true
        });
    }

    /// Registers the roots of a certificate just issued (`roots_pem`, the top
    /// of its chain) whose lifetime is `lifetime`: they are served while the
    /// returned handle lives. A root the bundle does not serve yet is added
    /// at once and makes the CA's roots be read again now.
    pub fn hold(self: &Arc<Self>, roots_pem: &[String], lifetime: Duration) -> RootsInUse {
        let mut ids = Vec::new();
        for pem in roots_pem {
            match RootCert::parse_all(pem) {
                Ok(certs) => ids.extend(certs.into_iter().map(|c| (c.id, c))),
                Err(e) => tracing::warn!(
                    "an issued chain's root cannot be read: {e}; not added to ROOTCA"
                ),
            }
        }
        let mut st = self.lock();
        st.longest_lifetime = st.longest_lifetime.max(lifetime);
        let mut unknown = false;
        for (id, cert) in &ids {
            let known = st
                .roots
                .entry(*id)
                .or_insert_with(|| Known::new(cert.clone()));
            known.in_use += 1;
            unknown |= !known.served;
        }
        self.recompute(&mut st);
        drop(st);
        if unknown {
            self.refresh_asked.store(true, Ordering::SeqCst);
            self.wake.notify_one();
        }
        RootsInUse {
            trust: Arc::downgrade(self),
            ids: ids.into_iter().map(|(id, _)| id).collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("trust bundle lock")
    }

    /// Reads the CA's roots once. Returns false when the CA could not be read
    /// (the bundle is kept as it is).
    async fn refresh(&self) -> bool {
        let answer = {
            // In line with renewals, so that `CA_MAX_CONCURRENCY` bounds
            // these reads too.
            let _permit = match &self.opts.queue {
                Some(q) => Some(q.acquire(Priority::Rotation).await),
                None => None,
            };
            self.ca.trust_roots().await
        };
        let mut st = self.lock();
        let served = st.roots.values().filter(|k| k.served).count();
        let pems = match answer {
            Ok(pems) if !pems.is_empty() => pems,
            Ok(_) => {
                if st.ca_read {
                    tracing::warn!(ca = %self.ca.describe(), "the CA listed no roots; keeping the {served} root(s) of the trust bundle (ROOTCA)");
                    metrics::trust_refresh(TrustRefresh::Failed);
                } else {
                    // A CA that has never listed roots: not a failure.
                    tracing::debug!(ca = %self.ca.describe(), "the CA lists no roots; ROOTCA holds the roots of issued chains and extra roots only");
                }
                return false;
            }
            Err(e) => {
                tracing::warn!(ca = %self.ca.describe(), "cannot read the CA's roots: {e}; keeping the {served} root(s) of the trust bundle (ROOTCA)");
                metrics::trust_refresh(TrustRefresh::Failed);
                return false;
            }
        };
        let mut listed = Vec::new();
        for pem in &pems {
            match RootCert::parse_all(pem) {
                Ok(certs) => listed.extend(certs),
                Err(e) => {
                    tracing::warn!(ca = %self.ca.describe(), "the CA listed a root that cannot be read: {e}; skipped")
                }
            }
        }
        if listed.is_empty() {
            metrics::trust_refresh(TrustRefresh::Failed);
            return false;
        }
        for k in st.roots.values_mut() {
            k.in_ca = false;
        }
        for cert in listed {
            st.roots
                .entry(cert.id)
                .or_insert_with(|| Known::new(cert))
                .in_ca = true;
        }
        st.ca_read = true;
        self.recompute(&mut st);
        metrics::trust_refresh(TrustRefresh::Ok);
        true
    }

    /// Re-reads the extra-roots file if it changed.
    fn check_extra(&self) {
        let mut st = self.lock();
        let Some(extra) = st.extra.as_mut() else {
            return;
        };
        match extra.read_if_changed() {
            Ok(None) => {}
            Ok(Some(certs)) => {
                tracing::info!(path = %extra.path().display(), roots = certs.len(), "TRUST_EXTRA_ROOTS changed");
                st.extra_error = None;
                for k in st.roots.values_mut() {
                    k.in_extra = false;
                }
                for cert in certs {
                    st.roots
                        .entry(cert.id)
                        .or_insert_with(|| Known::new(cert))
                        .in_extra = true;
                }
                self.recompute(&mut st);
            }
            Err(e) => {
                if st.extra_error.as_ref() != Some(&e) {
                    let kept = st.roots.values().filter(|k| k.in_extra).count();
                    tracing::error!("{e}; keeping the {kept} extra roots read before");
                    st.extra_error = Some(e);
                }
            }
        }
    }

    /// The removal window: the longer of the retention setting and the
    /// longest certificate lifetime seen.
    fn window(&self, st: &State) -> Duration {
        st.longest_lifetime.max(self.opts.retention)
    }

    /// Decides what is served now, logs every addition and removal, and
    /// publishes the bundle if it changed.
    fn recompute(&self, st: &mut State) {
        let now = self.opts.clock.now();
        let window = self.window(st);
        let mut serve = Vec::new();
        for (id, k) in st.roots.iter_mut() {
            k.retained |= k.in_ca || k.in_use > 0;
            if k.present() {
                k.absent_since = None;
            } else if k.absent_since.is_none() {
                k.absent_since = Some(now);
            }
            let expired = k.cert.not_after <= now;
            let gone = k.leaves_at(window).is_some_and(|t| t <= now);
            if !expired && !gone {
                serve.push(*id);
            }
        }
        if serve.is_empty() && st.roots.values().any(|k| k.served) {
            tracing::warn!("every root of the trust bundle (ROOTCA) has expired or gone; keeping it rather than serving an empty one");
            return;
        }
        for (id, k) in st.roots.iter_mut() {
            let now_served = serve.contains(id);
            if now_served && !k.served {
                tracing::info!(
                    subject = %k.cert.subject,
                    serial = %k.cert.serial,
                    expires = %rfc3339(k.cert.not_after),
                    "trust bundle (ROOTCA): added root ({})",
                    k.source()
                );
            } else if !now_served && k.served {
                let why = if k.cert.not_after <= now {
                    format!("it expired at {}", rfc3339(k.cert.not_after))
                } else if !k.retained {
                    "it was removed from TRUST_EXTRA_ROOTS".to_string()
                } else {
                    format!(
                        "it left the CA at {}, longer ago than {}s (the longest certificate lifetime seen, or TRUST_ROOT_RETENTION)",
                        rfc3339(k.absent_since.unwrap_or(now)),
                        window.as_secs()
                    )
                };
                tracing::info!(
                    subject = %k.cert.subject,
                    serial = %k.cert.serial,
                    expires = %rfc3339(k.cert.not_after),
                    "trust bundle (ROOTCA): removed root: {why}"
                );
            }
            k.served = now_served;
        }
        // Forget what is neither served nor has any source left.
        st.roots.retain(|_, k| k.served || k.present());

        let mut served: Vec<&Known> = st.roots.values().filter(|k| k.served).collect();
        served.sort_by(|a, b| {
            b.cert
                .not_after
                .cmp(&a.cert.not_after)
                .then_with(|| a.cert.pem.cmp(&b.cert.pem))
        });
        let pems: Vec<String> = served.iter().map(|k| k.cert.pem.clone()).collect();
        self.tx.send_if_modified(|cur| {
            if cur.pems == pems {
                return false;
            }
            let bundle = RootBundle {
                pems,
                generation: cur.generation + 1,
                federated: cur.federated.clone(),
                memo: Default::default(),
            };
            tracing::info!(roots = bundle.pems.len(), version = %bundle.version(), "trust bundle (ROOTCA) changed; pushing it on every ROOTCA stream");
            *cur = Arc::new(bundle);
            true
        });
    }

    /// When the served set changes next by itself (a root expires, or one
    /// that left its sources reaches the end of the window). Times already
    /// past are not counted: they were applied, or are held back to keep the
    /// bundle from becoming empty.
    fn next_change(&self) -> Option<Instant> {
        let st = self.lock();
        let window = self.window(&st);
        let now = self.opts.clock.now();
        st.roots
            .values()
            .filter(|k| k.served)
            .flat_map(|k| [Some(k.cert.not_after), k.leaves_at(window)])
            .flatten()
            .filter(|t| *t > now)
            .min()
            .map(|t| self.opts.clock.instant(t))
    }
}

#[cfg(test)]
mod tests;

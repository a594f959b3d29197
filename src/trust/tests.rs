//! The trust bundle under paused tokio time, against a fake CA whose roots
//! follow the same clock.

use std::time::{Duration, SystemTime};

use super::*;
use crate::ca::CaError;
use crate::secrets::test_support::{Call, FakeCa};

const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 86400);

struct Setup {
    ca: Arc<FakeCa>,
    trust: Arc<TrustBundle>,
    rx: RootsWatch,
}

/// A bundle refreshed every 60 s, with no retention floor unless `f` says.
async fn setup(f: impl FnOnce(&mut TrustOptions)) -> Setup {
    let clock = Clock::paused_at(SystemTime::now());
    let ca = FakeCa::new(clock);
    let mut opts = TrustOptions {
        refresh: Duration::from_secs(60),
        retention: Duration::ZERO,
        extra_roots: None,
        clock,
        queue: None,
    };
    f(&mut opts);
    let trust = TrustBundle::start(ca.clone(), opts).unwrap();
    let rx = trust.subscribe();
    // Let the first refresh run.
    tokio::time::sleep(Duration::from_millis(10)).await;
    Setup { ca, trust, rx }
}

impl Setup {
    fn served(&self) -> Vec<String> {
        self.trust.current().pems.clone()
    }

    fn lists(&self) -> usize {
        self.ca.count(|c| *c == Call::ListRoots)
    }

    /// The roots, by the fake CA's index, in the bundle now (sorted).
    fn indexes(&self) -> Vec<usize> {
        let served = self.served();
        let n = self.ca.roots.lock().unwrap().len();
        (0..n)
            .filter(|i| served.contains(&self.ca.root_pem(*i)))
            .collect()
    }
}

async fn sleep(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

/// Waits (in paused time) for the next push of the bundle.
async fn pushed(rx: &mut RootsWatch, within_secs: u64) {
    tokio::time::timeout(Duration::from_secs(within_secs), rx.changed())
        .await
        .expect("the bundle was not pushed in time")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_cas_roots_are_served_at_start_and_re_read_every_interval() {
    let mut s = setup(|_| {}).await;
    assert_eq!(s.indexes(), [0]);
    assert_eq!(s.lists(), 1, "read at start");
    s.rx.borrow_and_update();

    let new = s.ca.add_root(TEN_YEARS);
    s.ca.set_listing(Ok(vec![0, new]));
    sleep(59.0).await;
    assert_eq!(s.indexes(), [0], "not before the interval");
    assert!(!s.rx.has_changed().unwrap());
    sleep(2.0).await;
    assert_eq!(s.indexes(), [0, new]);
    assert_eq!(s.lists(), 2);
    assert!(s.rx.has_changed().unwrap(), "the change is pushed");
}

#[tokio::test(start_paused = true)]
async fn an_issued_chain_ending_in_an_unknown_root_serves_it_and_re_reads_the_ca_at_once() {
    let s = setup(|_| {}).await;
    let issuing = s.ca.add_root(TEN_YEARS);
    let other = s.ca.add_root(TEN_YEARS);
    s.ca.set_listing(Ok(vec![0, issuing, other]));
    let held = s
        .trust
        .hold(&[s.ca.root_pem(issuing)], Duration::from_secs(100));
    assert_eq!(s.indexes(), [0, issuing], "the chain's root at once");
    sleep(1.5).await;
    assert_eq!(s.lists(), 2, "re-read long before the 60 s interval");
    assert_eq!(s.indexes(), [0, issuing, other]);

    // A chain whose root is already served does not make the CA be read.
    let again = s
        .trust
        .hold(&[s.ca.root_pem(issuing)], Duration::from_secs(100));
    sleep(5.0).await;
    assert_eq!(s.lists(), 2);
    drop((held, again));
}

#[tokio::test(start_paused = true)]
async fn a_root_gone_from_the_ca_stays_for_the_longest_lifetime_seen_then_leaves() {
    let mut s = setup(|_| {}).await;
    let old = 0;
    let new = s.ca.add_root(TEN_YEARS);
    s.ca.set_listing(Ok(vec![old, new]));
    // Certificates of 100 s and 300 s were issued: the window is 300 s.
    let a = s
        .trust
        .hold(&[s.ca.root_pem(new)], Duration::from_secs(100));
    let b = s
        .trust
        .hold(&[s.ca.root_pem(new)], Duration::from_secs(300));
    sleep(2.0).await;
    assert_eq!(s.indexes(), [old, new]);

    // The operator deletes the old issuer; the next refresh sees it gone.
    s.ca.set_listing(Ok(vec![new]));
    sleep(60.0).await;
    let (seen_gone, _) =
        s.ca.calls()
            .into_iter()
            .rfind(|(_, c)| *c == Call::ListRoots)
            .unwrap();
    s.rx.borrow_and_update();
    sleep(290.0).await;
    assert_eq!(s.indexes(), [old, new], "kept within the window");
    assert!(!s.rx.has_changed().unwrap());
    pushed(&mut s.rx, 400).await;
    let after = seen_gone.elapsed();
    assert!(
        after >= Duration::from_secs(300) && after <= Duration::from_millis(300_100),
        "left {after:?} after the CA was seen without it"
    );
    assert_eq!(s.indexes(), [new]);
    drop((a, b));
}

#[tokio::test(start_paused = true)]
async fn the_retention_setting_is_a_floor_of_the_window() {
    let s = setup(|o| o.retention = Duration::from_secs(1000)).await;
    let new = s.ca.add_root(TEN_YEARS);
    s.ca.set_listing(Ok(vec![new]));
    let _a = s
        .trust
        .hold(&[s.ca.root_pem(new)], Duration::from_secs(100));
    sleep(61.0).await;
    sleep(900.0).await;
    assert_eq!(
        s.indexes(),
        [0, new],
        "1000 s floor, though certificates live 100 s"
    );
    sleep(100.0).await;
    assert_eq!(s.indexes(), [new]);
}

#[tokio::test(start_paused = true)]
async fn a_root_a_certificate_in_use_chains_to_is_never_removed() {
    let s = setup(|_| {}).await;
    let private = s.ca.add_root(TEN_YEARS);
    // The CA never lists it (say, another mount signed).
    let held = s
        .trust
        .hold(&[s.ca.root_pem(private)], Duration::from_secs(100));
    sleep(1000.0).await;
    assert_eq!(s.indexes(), [0, private]);
    // Out of use, it leaves after the window.
    drop(held);
    sleep(99.0).await;
    assert_eq!(s.indexes(), [0, private]);
    sleep(2.0).await;
    assert_eq!(s.indexes(), [0]);
}

#[tokio::test(start_paused = true)]
async fn an_expired_root_leaves_but_the_bundle_is_never_emptied() {
    let mut s = setup(|_| {}).await;
    let short = s.ca.add_root(Duration::from_secs(500));
    s.ca.set_listing(Ok(vec![0, short]));
    sleep(61.0).await;
    assert_eq!(s.indexes(), [0, short]);
    s.rx.borrow_and_update();
    pushed(&mut s.rx, 500).await;
    assert_eq!(s.indexes(), [0], "the expired root left on its own");

    // Now the CA lists only a root that expires (and root 0, in no
    // certificate's chain, leaves at once: no lifetime was seen): the last
    // root is kept once expired, rather than serving nothing.
    let lonely = s.ca.add_root(Duration::from_secs(1000));
    s.ca.set_listing(Ok(vec![lonely]));
    sleep(61.0).await;
    assert_eq!(s.indexes(), [lonely]);
    sleep(2000.0).await;
    assert_eq!(s.indexes(), [lonely], "expired, but the last one");
    assert!(!s.served().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_ca_that_cannot_be_read_keeps_the_last_good_bundle() {
    let mut s = setup(|_| {}).await;
    let new = s.ca.add_root(TEN_YEARS);
    s.ca.set_listing(Ok(vec![0, new]));
    let _a = s
        .trust
        .hold(&[s.ca.root_pem(new)], Duration::from_secs(100));
    sleep(61.0).await;
    assert_eq!(s.indexes(), [0, new]);
    s.rx.borrow_and_update();
    let lists = s.lists();
    let (failed, ok) = (refreshes("failed"), refreshes("ok"));

    // Down, then answering nothing: many refreshes, far past the window.
    s.ca.set_listing(Err(CaError::Unavailable("connection refused".into())));
    sleep(500.0).await;
    s.ca.set_listing(Ok(vec![]));
    sleep(500.0).await;
    let tries = s.lists() - lists;
    assert!(tries >= 10, "it kept trying: {tries}");
    assert_eq!(s.indexes(), [0, new], "both roots kept");
    assert!(!s.rx.has_changed().unwrap(), "nothing pushed");
    // Each try is counted as failed (other tests of this process may count
    // more, never fewer).
    assert!(refreshes("failed") >= failed + tries as u64);

    // Positive control: once the CA answers without root 0, it leaves
    // after the window.
    s.ca.set_listing(Ok(vec![new]));
    pushed(&mut s.rx, 200).await;
    assert_eq!(s.indexes(), [new]);
    assert!(refreshes("ok") > ok);
}

/// `node_agent_trust_refreshes_total{outcome}` of the process's metrics.
fn refreshes(outcome: &str) -> u64 {
    let text = crate::metrics::global().encode(crate::metrics::Format::Prometheus);
    let series = format!("node_agent_trust_refreshes_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn extra_roots_are_served_and_every_change_of_the_file_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("extra.pem");
    let other_clock = Clock::system();
    let x = crate::secrets::test_support::TestRoot::new(&other_clock, "extra x", TEN_YEARS);
    let y = crate::secrets::test_support::TestRoot::new(&other_clock, "extra y", TEN_YEARS);
    std::fs::write(&path, &x.pem).unwrap();
    // A long retention: a root removed from the file must not wait for it.
    let mut s = setup(|o| {
        o.extra_roots = Some(path.clone());
        o.retention = Duration::from_secs(1000);
    })
    .await;
    let has = |s: &Setup, pem: &str| {
        let pem = crate::crypto::split_pem_certs(pem).unwrap().remove(0);
        s.served().contains(&pem)
    };
    assert!(has(&s, &x.pem) && has(&s, &s.ca.root_pem(0)));
    s.rx.borrow_and_update();

    std::fs::write(&path, &y.pem).unwrap();
    pushed(&mut s.rx, 6).await;
    assert!(has(&s, &y.pem), "the new extra root");
    assert!(!has(&s, &x.pem), "one removed from the file leaves at once");
    assert!(has(&s, &s.ca.root_pem(0)));

    // A broken file keeps what was read before.
    std::fs::write(&path, "garbage").unwrap();
    sleep(30.0).await;
    assert!(has(&s, &y.pem));
    assert!(!s.rx.has_changed().unwrap());
    // Fixed again: pushed.
    std::fs::write(&path, format!("{}{}", x.pem, y.pem)).unwrap();
    pushed(&mut s.rx, 6).await;
    assert!(has(&s, &x.pem) && has(&s, &y.pem));
}

#[tokio::test]
async fn an_unreadable_extra_roots_file_stops_the_start() {
    let ca = FakeCa::new(Clock::system());
    let opts = TrustOptions {
        extra_roots: Some("/nonexistent/extra.pem".into()),
        ..TrustOptions::default()
    };
    let e = TrustBundle::start(ca, opts).err().unwrap();
    assert!(
        e.to_string()
            .contains("TRUST_EXTRA_ROOTS /nonexistent/extra.pem"),
        "{e}"
    );
}

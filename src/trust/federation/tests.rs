use super::*;
use crate::config::BundleSource;
use std::path::Path;

/// A self-signed CA certificate, DER, with `uri` as URI SAN if given,
/// valid for `days` from now (negative: expired).
fn root(uri: Option<&str>, days: i64) -> Vec<u8> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    if let Some(u) = uri {
        p.subject_alt_names = vec![rcgen::SanType::URI(u.try_into().unwrap())];
    }
    let now = ::time::OffsetDateTime::now_utc();
    p.not_before = now - ::time::Duration::days(2 * days.abs() + 1);
    p.not_after = now + ::time::Duration::days(days);
    p.self_signed(&kp).unwrap().der().to_vec()
}

fn bundle(roots: &[Vec<u8>], hint_secs: u64) -> Vec<u8> {
    spiffe_bundle::to_json(roots, 1, Duration::from_secs(hint_secs))
        .unwrap()
        .into_bytes()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

#[test]
fn a_bundle_is_accepted_or_refused_with_the_reason() {
    let now = SystemTime::now();
    let other = td("other.example");
    let plain = root(None, 30);
    let named = root(Some("spiffe://other.example"), 30);
    let a = accept(&other, &bundle(&[plain.clone(), named], 60), now).unwrap();
    assert_eq!(a.roots.len(), 2);
    assert_eq!(a.refresh_hint, Some(Duration::from_secs(60)));

    // PEM, as a static file may hold it: no hint.
    let pem = crate::crypto::der_to_pem(&plain);
    let a = accept(&other, pem.as_bytes(), now).unwrap();
    assert_eq!((a.roots.len(), a.refresh_hint), (1, None));

    // A root of another trust domain refuses the whole bundle.
    let foreign = root(Some("spiffe://cluster.local"), 30);
    let e = accept(&other, &bundle(&[plain.clone(), foreign], 60), now).unwrap_err();
    assert!(
        e.contains("\"cluster.local\"") && e.contains("not other.example"),
        "{e}"
    );

    // Expired roots are not served; none left refuses.
    let expired = root(None, -1);
    let a = accept(&other, &bundle(&[plain, expired.clone()], 60), now).unwrap();
    assert_eq!(a.roots.len(), 1);
    let e = accept(&other, &bundle(&[expired], 60), now).unwrap_err();
    assert!(e.contains("valid now"), "{e}");

    for garbage in [&b"<html>oops</html>"[..], b"", br#"{"keys": []}"#] {
        assert!(accept(&other, garbage, now).is_err());
    }
}

fn config(dir: &Path, min: u64, max: u64, max_bytes: usize) -> FederationConfig {
    FederationConfig {
        path: dir.join("federation.json"),
        domains: vec![FederatedDomain {
            trust_domain: td("other.example"),
            source: BundleSource::File {
                path: dir.join("other.json"),
            },
        }],
        refresh_min: Duration::from_secs(min),
        refresh_max: Duration::from_secs(max),
        max_bundle_bytes: max_bytes,
    }
}

type Seen = Arc<Mutex<Vec<Arc<Federated>>>>;

fn start(cfg: &FederationConfig) -> (Federation, Seen) {
    let seen = Seen::default();
    let s = seen.clone();
    let f = Federation::start(
        cfg,
        Clock::system(),
        Arc::new(move |fed| s.lock().unwrap().push(fed)),
    )
    .unwrap();
    (f, seen)
}

/// Lets the domain's task run until it sleeps again, `d` later.
async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn roots_seen(seen: &Seen) -> Vec<usize> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|f| f[&td("other.example")].len())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_refresh_hint_is_followed_within_the_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("other.json");
    let (a, b) = (root(None, 30), root(None, 30));
    std::fs::write(&file, bundle(std::slice::from_ref(&a), 20)).unwrap();
    let (_f, seen) = start(&config(dir.path(), 5, 60, 1 << 20));
    advance(Duration::from_millis(1)).await;
    assert_eq!(roots_seen(&seen), [1]);

    // The hint says 20 s: the change is not read at 19 s, and is at 20 s.
    std::fs::write(&file, bundle(&[a.clone(), b.clone()], 1)).unwrap();
    advance(Duration::from_secs(19)).await;
    assert_eq!(roots_seen(&seen), [1]);
    advance(Duration::from_secs(1)).await;
    assert_eq!(roots_seen(&seen), [1, 2]);

    // A hint of 1 s is held to FEDERATION_REFRESH_MIN (5 s).
    std::fs::write(&file, bundle(std::slice::from_ref(&b), 100_000)).unwrap();
    advance(Duration::from_secs(4)).await;
    assert_eq!(roots_seen(&seen), [1, 2]);
    advance(Duration::from_secs(1)).await;
    assert_eq!(roots_seen(&seen), [1, 2, 1]);

    // A hint of 100 000 s is held to FEDERATION_REFRESH_MAX (60 s).
    std::fs::write(&file, bundle(&[a, b], 100_000)).unwrap();
    advance(Duration::from_secs(59)).await;
    assert_eq!(roots_seen(&seen).len(), 3);
    advance(Duration::from_secs(1)).await;
    assert_eq!(roots_seen(&seen), [1, 2, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn the_last_good_bundle_stays_through_failures_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("other.json");
    let a = root(None, 30);
    std::fs::write(&file, bundle(std::slice::from_ref(&a), 10)).unwrap();
    let (_f, seen) = start(&config(dir.path(), 2, 60, 4096));
    advance(Duration::from_millis(1)).await;
    assert_eq!(roots_seen(&seen), [1]);

    // Gone, garbage, too large, another trust domain, no valid root: nothing
    // is published, and the task keeps trying (1 s, then 2 s: back-off
    // up to FEDERATION_REFRESH_MIN).
    let big = vec![b' '; 5000];
    let foreign = bundle(&[root(Some("spiffe://cluster.local"), 30)], 10);
    let expired = bundle(&[root(None, -1)], 10);
    std::fs::remove_file(&file).unwrap();
    advance(Duration::from_secs(10)).await;
    for bad in [&b"garbage"[..], &big, &foreign, &expired] {
        std::fs::write(&file, bad).unwrap();
        advance(Duration::from_secs(3)).await;
    }
    assert_eq!(roots_seen(&seen), [1]);

    // Back: read within the back-off cap.
    let b = root(None, 30);
    std::fs::write(&file, bundle(&[a, b], 10)).unwrap();
    advance(Duration::from_secs(2)).await;
    assert_eq!(roots_seen(&seen), [1, 2]);
}

#[tokio::test]
async fn a_source_that_cannot_be_set_up_names_its_domain() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2, 60, 4096);
    cfg.domains[0].source = BundleSource::HttpsSpiffe {
        url: "https://127.0.0.1:1".into(),
        endpoint_spiffe_id: "spiffe://other.example/server".into(),
        bootstrap_bundle: dir.path().join("missing.pem"),
    };
    let e = Federation::start(&cfg, Clock::system(), Arc::new(|_| {}))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("other.example") && e.to_string().contains("missing.pem"),
        "{e}"
    );
}

//! First fetches that fail or are abandoned, the identity cap, and a renewal
//! onto a new root as one push.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_failed_or_abandoned_first_fetch_leaves_no_entry() {
    let h = harness(|_| {});
    *h.ca.sign_error.lock().unwrap() = Some(CaError::Unavailable("down".into()));
    let e = h.m.subscribe(&jwt("a", None)).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(h.m.cached_identities(), 0);
    *h.ca.sign_error.lock().unwrap() = None;

    let refused = jwt("b", None);
    h.ca.reject(&refused);
    assert!(h.m.subscribe(&refused).await.is_err());
    assert_eq!(h.m.cached_identities(), 0);

    // A subscriber that gives up while its CA request runs.
    *h.ca.sign_latency.lock().unwrap() = Duration::from_secs(30);
    let m = h.m.clone();
    let task = tokio::spawn(async move { m.subscribe(&jwt("c", None)).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.m.cached_identities(), 1, "fetching");
    task.abort();
    let _ = task.await;
    assert_eq!(h.m.cached_identities(), 0);

    // Positive control: the same calls succeed and stay cached.
    *h.ca.sign_latency.lock().unwrap() = Duration::ZERO;
    let _ok = h.m.subscribe(&jwt("c", None)).await.unwrap();
    assert_eq!(h.m.cached_identities(), 1);
}

#[tokio::test(start_paused = true)]
async fn identities_past_the_cap_are_refused_without_asking_the_ca() {
    let h = harness(|o| o.max_identities = 2);
    let _a = h.m.subscribe(&jwt("a", None)).await.unwrap();
    let _b = h.m.subscribe(&jwt("b", None)).await.unwrap();
    let calls = h.ca.calls().len();
    let c = jwt("c", None);
    match h.m.subscribe(&c).await {
        Err(SecretError::LimitReached { setting, .. }) => assert_eq!(setting, "MAX_IDENTITIES"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.ca.calls().len(), calls, "the CA was not asked");
    // A known identity is still served.
    assert!(h.m.subscribe(&jwt("a", None)).await.is_ok());
}

/// What a stream would push: the leaf and the bundle.
type Pushes = Arc<std::sync::Mutex<Vec<(String, Vec<String>)>>>;

/// Counts pushes as an SDS stream serving both resources would: one per
/// change of the (certificate, bundle) versions it observes.
async fn observe_pushes(mut rx: SecretWatch, log: Pushes) {
    let mut last = None;
    while rx.changed().await.is_ok() {
        let state = rx.borrow_and_update().clone();
        let Some(secret) = state.secret else { continue };
        let now = (secret.cert_version(), state.roots.version());
        if last.as_ref() != Some(&now) {
            last = Some(now);
            log.lock().unwrap().push((
                crate::crypto::split_pem_certs(&secret.chain_pem).unwrap()[0].clone(),
                state.roots.pems.clone(),
            ));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_renewal_onto_a_new_root_is_one_change_holding_both() {
    let h = harness(|_| {});
    let mut sub = h.m.subscribe(&jwt("a", None)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old_root = h.ca.root_pem(0);
    assert_eq!(
        sub.secret.borrow().roots.pems,
        std::slice::from_ref(&old_root)
    );
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(observe_pushes(sub.secret.clone(), log.clone()));

    // The CA's new root signs from now on (and is listed with the old one).
    let new = h.ca.add_root(Duration::from_secs(20 * 365 * 86400));
    h.ca.set_listing(Ok(vec![0, new]));
    *h.ca.signing.lock().unwrap() = new;
    let before = serial(&sub);
    next_cert(&mut sub, &before, Duration::from_secs(60)).await;
    // Let the trust bundle's refresh and its fan-out run.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let pushes = log.lock().unwrap().clone();
    assert_eq!(
        pushes.len(),
        1,
        "one push for the renewal: {:?}",
        pushes.iter().map(|p| p.1.len()).collect::<Vec<_>>()
    );
    let (_, roots) = &pushes[0];
    assert!(
        roots.contains(&h.ca.root_pem(new)),
        "the new certificate came with its root"
    );
    assert!(
        roots.contains(&old_root),
        "and the old root stays: the CA lists it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_jwt_the_ca_has_not_proven_holds_no_identity_slot() {
    let h = harness(|o| o.max_identities = 1);
    *h.ca.login_latency.lock().unwrap() = Duration::from_secs(10);
    let forged = jwt("forged", None);
    h.ca.reject(&forged);
    let m = h.m.clone();
    let forged_login = tokio::spawn(async move { m.subscribe(&forged).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.m.cached_identities(), 0, "no slot while the CA judges it");
    // A real workload arriving meanwhile takes the only slot.
    let real = h.m.subscribe(&jwt("real", None)).await;
    assert!(real.is_ok(), "{real:?}");
    assert!(matches!(
        forged_login.await.unwrap(),
        Err(SecretError::Login(_))
    ));
    assert_eq!(h.m.cached_identities(), 1);
}

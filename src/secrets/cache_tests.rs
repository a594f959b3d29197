//! Unit tests of the cache: reservations, installs, forgets and the cap.

use super::*;
use crate::secrets::test_support::{jwt, secret_for};

fn key(sa: &str) -> CacheKey {
    CacheKey {
        identity: SpiffeId(format!("spiffe://td/ns/ns/sa/{sa}")),
        key_type: KeyType::EcP256,
    }
}

#[tokio::test]
async fn a_forgotten_entry_takes_no_install_and_no_watcher() {
    let cache = Cache::new(10, 4);
    let pending = cache.reserve(&key("a"), Default::default()).unwrap();
    let entry = pending.entry().clone();
    let s = secret_for(&entry.key.identity).await;
    assert_eq!(
        cache.install(&entry, s.clone(), Default::default()),
        Ok(Installed::First)
    );
    let (rx, lease, _) = cache.attach(&entry, &jwt("a", None)).unwrap();
    assert_eq!(entry.jwts().live(0).len(), 1);

    // Watched: idle eviction is refused; the credential check is not.
    assert!(cache.forget(&entry, Forget::Idle).is_none());
    assert!(
        cache.forget(&entry, Forget::NoCredential("x")).is_none(),
        "a live JWT"
    );
    drop(lease);
    assert!(
        cache.forget(&entry, Forget::Idle).is_none(),
        "still watched"
    );
    let released = cache.forget(&entry, Forget::NoCredential("gone")).unwrap();
    assert_eq!(released.len(), 1, "its JWT is handed back for release");
    assert_eq!(rx.borrow().closed.as_deref(), Some("gone"));
    assert!(rx.borrow().secret.is_none());
    assert_eq!(cache.len(), 0);

    // Nothing reaches it any more.
    assert_eq!(cache.install(&entry, s, Default::default()), Err(Forgotten));
    assert!(cache.attach(&entry, &jwt("a", None)).is_none());
    assert!(cache.forget(&entry, Forget::Idle).is_none());
    drop(pending);
    // A new subscriber gets a fresh entry.
    let again = cache.reserve(&key("a"), Default::default()).unwrap();
    assert!(!Arc::ptr_eq(again.entry(), &entry));
    assert!(!again.entry().is_forgotten());
}

#[tokio::test]
async fn a_first_fetch_nobody_waits_for_leaves_the_cache() {
    let cache = Cache::new(10, 4);
    let a = cache.reserve(&key("a"), Default::default()).unwrap();
    let b = cache.reserve(&key("a"), Default::default()).unwrap();
    assert!(Arc::ptr_eq(a.entry(), b.entry()));
    let entry = a.entry().clone();
    drop(a);
    assert_eq!(cache.len(), 1, "another subscriber still fetches");
    drop(b);
    assert_eq!(cache.len(), 0);
    assert!(entry.is_forgotten());

    // Once installed, it stays when its subscribers are done (eviction
    // decides then).
    let c = cache.reserve(&key("a"), Default::default()).unwrap();
    let s = secret_for(&c.entry().key.identity).await;
    cache.install(c.entry(), s, Default::default()).unwrap();
    drop(c);
    assert_eq!(cache.len(), 1);
}

#[tokio::test]
async fn identities_are_capped_and_known_ones_still_served() {
    let cache = Cache::new(2, 4);
    let _a = cache.reserve(&key("a"), Default::default()).unwrap();
    let _b = cache.reserve(&key("b"), Default::default()).unwrap();
    match cache.reserve(&key("c"), Default::default()) {
        Err(SecretError::LimitReached { setting, message }) => {
            assert_eq!(setting, "MAX_IDENTITIES");
            assert!(message.contains("sa/c"), "{message}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(cache.reserve(&key("a"), Default::default()).is_ok());
}

#[tokio::test]
async fn an_install_brings_its_roots_and_roots_only_move_forward() {
    let cache = Cache::new(2, 4);
    let p = cache.reserve(&key("a"), Default::default()).unwrap();
    let bundle = |g: u64| {
        Arc::new(RootBundle {
            pems: vec![format!("root {g}")],
            generation: g,
            ..Default::default()
        })
    };
    let s = secret_for(&p.entry().key.identity).await;
    let (mut rx, _lease, _) = cache.attach(p.entry(), &jwt("a", None)).unwrap();
    // The certificate and the bundle holding its root: one change.
    cache.install(p.entry(), s.clone(), bundle(2)).unwrap();
    assert!(rx.has_changed().unwrap());
    {
        let state = rx.borrow_and_update();
        assert!(state.secret.is_some());
        assert_eq!(state.roots.generation, 2);
    }
    cache.publish_roots(&bundle(1));
    assert_eq!(
        rx.borrow().roots.generation,
        2,
        "an older bundle is ignored"
    );
    cache.install(p.entry(), s, bundle(1)).unwrap();
    assert_eq!(rx.borrow().roots.generation, 2);
    cache.publish_roots(&bundle(3));
    assert_eq!(rx.borrow().roots.generation, 3);
}

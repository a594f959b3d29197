//! Tests of the login slots (src/ca/vault/login.rs).

use std::time::SystemTime;

use base64::Engine;

use super::*;

fn auth_answer(token: &str, token_type: Option<&str>) -> LoginAuth {
    LoginAuth {
        client_token: token.into(),
        lease_duration: 60,
        token_type: token_type.map(String::from),
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_is_cached_until_the_earlier_of_90_percent_of_its_lease_and_the_jwt_exp() {
    let now = Instant::now();
    let hour = Duration::from_secs(3600);
    // The JWT outlives the lease: 90% of the lease.
    assert_eq!(
        cache_until(now, hour, Some((10_000, 0))),
        now + hour.mul_f64(0.9)
    );
    assert_eq!(cache_until(now, hour, None), now + hour.mul_f64(0.9));
    // The JWT expires first: its exp.
    assert_eq!(
        cache_until(now, hour, Some((1_000_060, 1_000_000))),
        now + Duration::from_secs(60)
    );
    // Already expired: not cached at all.
    assert_eq!(cache_until(now, hour, Some((5, 10))), now);
    // An exp too far off to add to an instant: the lease.
    assert_eq!(
        cache_until(now, hour, Some((i64::MAX, 0))),
        now + hour.mul_f64(0.9)
    );
}

#[test]
fn batch_tokens_are_told_by_type_or_prefix() {
    assert!(auth_answer("s.x", Some("batch")).is_batch());
    assert!(!auth_answer("b.x", Some("service")).is_batch());
    assert!(auth_answer("hvb.x", None).is_batch());
    assert!(auth_answer("b.x", None).is_batch());
    assert!(!auth_answer("hvs.x", None).is_batch());
    assert!(!auth_answer("s.x", None).is_batch());
}

fn cached(until_in: Duration) -> CachedToken {
    let now = Instant::now();
    CachedToken {
        token: Arc::new(Zeroizing::new("s.t".into())),
        until: now + until_in,
        lease_end: now + until_in * 2,
        batch: false,
        sign_rejected: None,
    }
}

fn install(logins: &Logins, key: Key, t: CachedToken) -> Authorization {
    let (slot, _) = logins.slot(key);
    let auth = authorization(&t.token, key);
    lock(&slot.state).token = Some(t);
    auth
}

#[tokio::test(start_paused = true)]
async fn a_sign_rejection_is_held_down_for_its_token_only() {
    let logins = Logins::new(Clock::system());
    let auth = install(&logins, [1; 32], cached(Duration::from_secs(600)));
    assert!(logins.sign_held_down(&auth).is_none());
    logins.note_sign_rejection(&auth, &CaFailure::http("refused", 403, vec![]));
    let held = logins.sign_held_down(&auth).expect("held down");
    assert_eq!(held.message(), "refused");
    // Another token of the same JWT is not held down by it.
    let other = install(&logins, [1; 32], cached(Duration::from_secs(600)));
    assert!(logins.sign_held_down(&other).is_none());
    logins.note_sign_rejection(&other, &CaFailure::new("refused"));
    tokio::time::advance(REJECTION_HOLD_DOWN - Duration::from_millis(10)).await;
    assert!(logins.sign_held_down(&other).is_some());
    tokio::time::advance(Duration::from_millis(20)).await;
    assert!(
        logins.sign_held_down(&other).is_none(),
        "asked again after the hold-down"
    );
}

#[tokio::test(start_paused = true)]
async fn invalidate_forces_one_relogin_per_hold_down() {
    let logins = Logins::new(Clock::system());
    let key = [2; 32];
    let first = install(&logins, key, cached(Duration::from_secs(600)));
    logins.invalidate(&first);
    let slot = logins.existing(&key).unwrap();
    assert!(lock(&slot.state).token.is_none(), "dropped");

    // The re-login's token is refused too, at once: kept (hold-down).
    let second = install(&logins, key, cached(Duration::from_secs(600)));
    logins.invalidate(&second);
    assert!(
        lock(&slot.state).token.is_some(),
        "kept within the hold-down"
    );
    // An authorization of a token no longer cached changes nothing.
    logins.invalidate(&first);
    assert!(lock(&slot.state).token.is_some());

    tokio::time::advance(REJECTION_HOLD_DOWN).await;
    logins.invalidate(&second);
    assert!(
        lock(&slot.state).token.is_none(),
        "dropped after the hold-down"
    );
}

#[tokio::test(start_paused = true)]
async fn lapsed_slots_are_swept_and_their_service_tokens_returned_for_revocation() {
    let logins = Logins::new(Clock::system());
    for i in 0..64u8 {
        let mut t = cached(Duration::from_secs(10));
        t.batch = i % 2 == 1;
        install(&logins, [i; 32], t);
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    let (_, lapsed) = logins.slot([200; 32]);
    assert_eq!(lapsed.len(), 32, "the service tokens, not the batch ones");
    assert_eq!(lock(&logins.slots).map.len(), 1);
}

#[test]
fn release_and_take_all_skip_batch_tokens() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let logins = Logins::new(Clock::system());
        let jwt = Credential::new("a.b.c");
        let mut t = cached(Duration::from_secs(60));
        t.batch = true;
        install(&logins, key_of(&jwt), t);
        assert!(
            logins.release(&jwt).is_none(),
            "a batch token is not revoked"
        );
        assert!(logins.existing(&key_of(&jwt)).is_none(), "released");

        install(&logins, [3; 32], cached(Duration::from_secs(60)));
        install(&logins, [4; 32], cached(Duration::from_secs(60)));
        assert_eq!(logins.take_all().len(), 2);
        assert!(logins.take_all().is_empty());
    });
}

/// `cached_login` while a login with the same JWT is in flight waits for it
/// and returns its token: a busy slot is not "no credential".
#[tokio::test(start_paused = true)]
async fn cached_waits_for_a_login_in_flight_with_the_same_jwt() {
    let logins = Arc::new(Logins::new(Clock::system()));
    let jwt = Credential::new("a.b.c");
    let key = key_of(&jwt);
    // A login in flight: it holds the slot's lock, as `login` does while
    // Vault answers, and then caches the token Vault gave.
    let (slot, _) = logins.slot(key);
    let (locked, is_locked) = tokio::sync::oneshot::channel();
    let login = tokio::spawn(async move {
        let _login = slot.login.lock().await;
        locked.send(()).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        lock(&slot.state).token = Some(cached(Duration::from_secs(600)));
    });
    is_locked.await.unwrap();
    let asked = tokio::spawn({
        let (logins, jwt) = (logins.clone(), jwt.clone());
        async move { logins.cached(&jwt).await }
    });
    let auth = asked
        .await
        .unwrap()
        .expect("the token of the login in flight");
    assert_eq!(auth.token.as_deref().map(|t| t.as_str()), Some("s.t"));
    assert_eq!(auth.slot, Some(key));
    login.await.unwrap();
    // Without a login in flight or a token, there is none.
    assert!(logins.cached(&Credential::new("x.y.z")).await.is_none());
}

/// A JWT of `ns/sa` expiring at `exp` (Unix seconds).
fn jwt_expiring_at(exp: i64) -> Credential {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    Credential::new(format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"none"}"#),
        b64(&format!(
            r#"{{"sub":"system:serviceaccount:ns:sa","exp":{exp}}}"#
        ))
    ))
}

/// The JWT's `exp` is read against the client's clock, not the system's:
/// under a paused clock far from the system's now, a token Vault leased for
/// an hour is used exactly until the JWT expires by that clock.
#[tokio::test(start_paused = true)]
async fn a_token_is_used_until_the_jwt_expires_by_the_clock() {
    const EPOCH: i64 = 1_000_000_000;
    let clock = Clock::paused_at(SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH as u64));
    let logins = Logins::new(clock);
    let jwt = jwt_expiring_at(EPOCH + 60);
    let (slot, _) = logins.slot(key_of(&jwt));
    let mut answer = auth_answer("s.t", None);
    answer.lease_duration = 3600;
    let start = Instant::now();
    let (_, until) = logins.keep(&slot, answer, Some(EPOCH + 60), start);
    assert_eq!(until, start + Duration::from_secs(60), "bounded by the exp");

    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(logins.cached(&jwt).await.is_some(), "the JWT still holds");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(logins.cached(&jwt).await.is_none(), "the JWT has expired");
}

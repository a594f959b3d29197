//! Tests of reading a workload's JWT: its claims, its SPIFFE ID, its expiry.

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn jwt(payload: &str) -> Credential {
    let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(payload);
    Credential::new(format!("{h}.{p}.c2lnbmF0dXJl"))
}

fn spiffe(c: &Credential) -> Result<String, IdentityError> {
    Ok(c.claims()?.service_account.spiffe_id("cluster.local").0)
}

#[test]
fn legacy_token_sub() {
    let c =
        jwt(r#"{"iss":"kubernetes/serviceaccount","sub":"system:serviceaccount:default:httpbin"}"#);
    assert_eq!(
        spiffe(&c).unwrap(),
        "spiffe://cluster.local/ns/default/sa/httpbin"
    );
    assert_eq!(c.claims().unwrap().expires_at, None);
}

#[test]
fn projected_token() {
    let c = jwt(
        r#"{"aud":["api"],"exp":1900000000,"sub":"system:serviceaccount:foo:bar",
            "kubernetes.io":{"namespace":"foo","serviceaccount":{"name":"bar","uid":"1"}}}"#,
    );
    assert_eq!(spiffe(&c).unwrap(), "spiffe://cluster.local/ns/foo/sa/bar");
    assert_eq!(c.claims().unwrap().expires_at, Some(1900000000));
    // The kubernetes.io claim alone is enough.
    let c = jwt(r#"{"kubernetes.io":{"namespace":"ns1","serviceaccount":{"name":"sa1"}}}"#);
    assert_eq!(spiffe(&c).unwrap(), "spiffe://cluster.local/ns/ns1/sa/sa1");
}

#[test]
fn expired_tokens_are_not_current() {
    let c = jwt(r#"{"sub":"system:serviceaccount:a:b","exp":1000}"#);
    let claims = c.claims().unwrap();
    assert_eq!(claims.clone().current_at(999), Ok(claims.clone()));
    assert_eq!(
        claims.clone().current_at(1000),
        Err(IdentityError::Expired { exp: 1000 })
    );
    let at = |secs| Clock::paused_at(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
    assert!(c.current_claims_by(&at(999)).is_ok());
    assert!(c.current_claims_by(&at(1000)).is_err());
    assert!(
        c.current_claims_by(&Clock::system()).is_err(),
        "1000 s after the epoch is past"
    );
    let forever = jwt(r#"{"sub":"system:serviceaccount:a:b"}"#);
    assert!(
        forever.current_claims_by(&Clock::system()).is_ok(),
        "no exp never expires"
    );
    // The same answers without copying the claims; the SPIFFE ID made
    // once is still refused once the token has expired.
    assert_eq!(c.check_current(&at(999)), Ok(()));
    assert_eq!(
        c.check_current(&at(1000)),
        Err(IdentityError::Expired { exp: 1000 })
    );
    let id = c.spiffe_id_by("td", &at(999)).unwrap();
    assert_eq!(id.0, "spiffe://td/ns/a/sa/b");
    assert_eq!(c.spiffe_id_by("td", &at(999)), Ok(id));
    assert_eq!(
        c.spiffe_id_by("td", &at(1000)),
        Err(IdentityError::Expired { exp: 1000 })
    );
    assert_eq!(
        c.spiffe_id_by("other.td", &at(999)).unwrap().0,
        "spiffe://other.td/ns/a/sa/b"
    );
    assert_eq!(
        jwt("not json").spiffe_id_by("td", &at(0)),
        Err(IdentityError::BadPayload)
    );
}

#[test]
fn trust_domain_is_used() {
    let c = jwt(r#"{"sub":"system:serviceaccount:a:b"}"#);
    let sa = c.claims().unwrap().service_account;
    assert_eq!(
        sa.spiffe_id("example.org").0,
        "spiffe://example.org/ns/a/sa/b"
    );
}

#[test]
fn garbage_is_refused_without_panicking() {
    assert_eq!(Credential::new("").claims(), Err(IdentityError::NotAJwt));
    assert_eq!(Credential::new("abc").claims(), Err(IdentityError::NotAJwt));
    assert_eq!(
        Credential::new("a.b.c.d").claims(),
        Err(IdentityError::NotAJwt)
    );
    assert_eq!(
        Credential::new("a.!!!.c").claims(),
        Err(IdentityError::BadPayload)
    );
    assert_eq!(jwt("not json").claims(), Err(IdentityError::BadPayload));
    assert_eq!(
        jwt(r#"{"sub":"alice"}"#).claims(),
        Err(IdentityError::NoServiceAccount)
    );
    assert_eq!(
        jwt(r#"{"sub":"system:serviceaccount:onlyns"}"#).claims(),
        Err(IdentityError::NoServiceAccount)
    );
    assert!(matches!(
        jwt(r#"{"sub":"system:serviceaccount:ns:evil/../x"}"#).claims(),
        Err(IdentityError::BadName(_))
    ));
    // Arbitrary bytes never panic.
    for s in ["..", "\u{0}.\u{1}.\u{2}", "é.é.é", "a..b"] {
        let _ = Credential::new(s).claims();
    }
}

#[test]
fn debug_does_not_leak_the_token() {
    let c = jwt(r#"{"sub":"system:serviceaccount:a:b"}"#);
    let shown = format!("{c:?}");
    assert!(!shown.contains(c.expose()), "{shown}");
    assert!(!shown.contains("eyJ"), "{shown}");
}

#[test]
fn names_are_checked_as_kubernetes_checks_them() {
    for good in ["a", "default", "my-sa", "a.b", "sa-1.team-2", "0"] {
        assert!(is_k8s_name(good), "{good}");
    }
    for bad in [
        "", ".", "..", ".a", "a.", "-a", "a-", "a..b", "a.-b", "A", "a_b", "a/b",
    ] {
        assert!(!is_k8s_name(bad), "{bad:?}");
    }
    assert!(is_k8s_name(&["a".repeat(63), "b".repeat(63)].join(".")));
    assert!(!is_k8s_name(&"a".repeat(64)), "a label is at most 63");
    assert!(is_k8s_label("kube-system") && !is_k8s_label("a.b"));
    assert!(!is_k8s_label(&"a".repeat(64)));
    // Through the claims: a `..` service account names no identity.
    let c = jwt(r#"{"sub":"system:serviceaccount:default:.."}"#);
    assert!(matches!(c.claims(), Err(IdentityError::BadName(_))));
    let c = jwt(r#"{"sub":"system:serviceaccount:a.b:sa"}"#);
    assert!(matches!(c.claims(), Err(IdentityError::BadName(_))));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn check(c: &Credential) -> Result<(), TestCaseError> {
        match c.claims() {
            Ok(claims) => {
                let sa = &claims.service_account;
                prop_assert!(is_k8s_label(&sa.namespace) && is_k8s_name(&sa.name));
                let id = sa.spiffe_id("cluster.local");
                prop_assert_eq!(
                    id.as_str().matches('/').count(),
                    6,
                    "{} has exactly ns/<ns>/sa/<name> below the trust domain",
                    id
                );
                // Any clock: a typed answer, never a panic or an overflow.
                for now in [i64::MIN, -1, 0, Clock::system().unix_now(), i64::MAX] {
                    match claims.clone().current_at(now) {
                        Ok(_) => {}
                        Err(IdentityError::Expired { exp }) => {
                            prop_assert!(claims.expires_at == Some(exp) && exp <= now)
                        }
                        Err(e) => prop_assert!(false, "unexpected {e:?}"),
                    }
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    }

    proptest! {
        /// Any text as a credential: claims or a typed error.
        #[test]
        fn any_text(s in "\\PC{0,200}") {
            check(&Credential::new(s))?;
        }

        /// Three parts, the payload arbitrary bytes.
        #[test]
        fn any_payload_bytes(payload in prop::collection::vec(any::<u8>(), 0..300)) {
            check(&jwt_bytes(&payload))?;
        }

        /// JSON payloads shaped like service-account tokens, with
        /// arbitrary values where a Kubernetes name or a time goes.
        #[test]
        fn token_shaped_json(
            ns in "\\PC{0,20}",
            name in "\\PC{0,20}",
            exp in prop::option::of(any::<i64>()),
            legacy in any::<bool>(),
        ) {
            let mut v = if legacy {
                serde_json::json!({ "sub": format!("system:serviceaccount:{ns}:{name}") })
            } else {
                serde_json::json!({
                    "kubernetes.io": { "namespace": ns, "serviceaccount": { "name": name } }
                })
            };
            if let Some(exp) = exp {
                v["exp"] = exp.into();
            }
            let c = jwt(&v.to_string());
            check(&c)?;
            let valid = is_k8s_label(&ns) && is_k8s_name(&name);
            prop_assert_eq!(c.claims().is_ok(), valid, "{}", v);
        }
    }

    fn jwt_bytes(payload: &[u8]) -> Credential {
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#);
        Credential::new(format!("{h}.{}.c2ln", URL_SAFE_NO_PAD.encode(payload)))
    }
}

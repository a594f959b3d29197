//! Property tests of how the agent reads Vault's answers from their raw
//! text, as `VaultHttp` hands them over: login answers (`login_answer`),
//! sign answers (`sign_answer`, then `chain_from_sign_answer`) and the PKI
//! mount's issuer list (`issuer_ids`). Whatever Vault, or something posing
//! as it, answers (arbitrary JSON, a genuine answer with fields missing or
//! replaced, cut or garbled text), the agent gets what it needs or a
//! `BadAnswer` saying what is wrong, never a panic.

use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::http::{parse_json, Answer};
use super::login::{cache_until, login_answer, MAX_LEASE};
use super::roots::{issuer_ids, MAX_ISSUERS};
use super::{chain_from_sign_answer, sign_answer};
use crate::ca::CaError;

/// Keys Vault's answers use, so that arbitrary objects often hit them.
const KEYS: &[&str] = &[
    "auth",
    "client_token",
    "lease_duration",
    "token_type",
    "renewable",
    "policies",
    "data",
    "keys",
    "key_info",
    "certificate",
    "issuing_ca",
    "ca_chain",
    "serial_number",
    "errors",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(String::from),
        1 => "\\PC{0,12}",
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ]
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field of a genuine answer: kept most often, else missing or replaced.
fn field(genuine: Value) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        4 => Just(Some(genuine)),
        1 => Just(None),
        2 => any_json().prop_map(Some),
    ]
}

fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
    let mut m = Map::new();
    for (k, v) in fields {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    }
    Value::Object(m)
}

/// A login answer as OpenBao gives it, mutated.
fn login_json() -> impl Strategy<Value = Value> {
    let token = prop_oneof![
        3 => Just(json!("s.0123456789abcdef")),
        1 => Just(json!("b.batch-token")),
        1 => any::<String>().prop_map(Value::from),
        1 => "[\\x00-\\x7f]{0,12}".prop_map(Value::from),
    ];
    let lease = prop_oneof![
        3 => (0u64..100_000).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
    ];
    (
        token,
        lease,
        field(json!("service")),
        field(json!(["default", "istio-cert"])),
    )
        .prop_flat_map(|(token, lease, token_type, policies)| {
            let auth = object(vec![
                ("client_token", Some(token)),
                ("lease_duration", Some(lease)),
                ("token_type", token_type),
                ("policies", policies),
                ("renewable", Some(json!(true))),
            ]);
            field(auth).prop_map(|auth| {
                object(vec![
                    ("request_id", Some(json!("0d3c7c6e"))),
                    ("auth", auth),
                    ("data", Some(Value::Null)),
                ])
            })
        })
}

/// A genuine leaf and root, PEM.
fn pems() -> &'static (String, String) {
    static PEMS: OnceLock<(String, String)> = OnceLock::new();
    PEMS.get_or_init(|| {
        use crate::crypto::{KeyType, PrivateKey};
        let ca = crate::ca::local::LocalCa::new(None, "cluster.local").unwrap();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let id = crate::identity::SpiffeId("spiffe://cluster.local/ns/a/sa/b".into());
        let leaf = ca
            .sign_csr(&key.csr_pem(&id).unwrap(), Duration::from_secs(600))
            .unwrap();
        (leaf, ca.root_pem().to_string())
    })
}

/// A sign answer as OpenBao gives it, mutated.
fn sign_json() -> impl Strategy<Value = Value> {
    let (leaf, root) = pems();
    (
        field(json!(leaf)),
        field(json!(root)),
        field(json!([root])),
        field(json!("3d:7e:8f")),
    )
        .prop_flat_map(|(certificate, issuing_ca, ca_chain, serial)| {
            let data = object(vec![
                ("certificate", certificate),
                ("issuing_ca", issuing_ca),
                ("ca_chain", ca_chain),
                ("serial_number", serial),
            ]);
            field(data).prop_map(|data| object(vec![("data", data), ("auth", Some(Value::Null))]))
        })
}

/// A LIST of a PKI mount's issuers as OpenBao gives it, mutated.
fn issuers_json() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        4 => Just(json!("79d6da38-060f-bbf5-0ce4-b305c7bc6958")),
        1 => "[a-zA-Z0-9_-]{1,40}".prop_map(Value::from),
        1 => "\\PC{0,20}".prop_map(Value::from),
        1 => scalar(),
    ];
    let keys = prop_oneof![
        4 => prop::collection::vec(id, 0..6).prop_map(Value::Array),
        1 => (0..3usize).prop_map(|extra| {
            Value::Array((0..MAX_ISSUERS + extra).map(|i| json!(format!("id{i}"))).collect())
        }),
    ];
    (keys, field(json!({}))).prop_flat_map(|(keys, key_info)| {
        let data = object(vec![("keys", Some(keys)), ("key_info", key_info)]);
        field(data).prop_map(|data| object(vec![("data", data)]))
    })
}

/// The text of an answer: the value's JSON, or it cut short or garbled, or
/// text that is no JSON at all.
fn body(value: impl Strategy<Value = Value>) -> impl Strategy<Value = String> {
    value.prop_flat_map(|v| {
        let text = v.to_string();
        let len = text.len();
        prop_oneof![
            4 => Just(text.clone()),
            1 => (0..=len).prop_map({
                let text = text.clone();
                move |n| String::from_utf8_lossy(&text.as_bytes()[..n]).into_owned()
            }),
            1 => (0..len.max(1), any::<u8>()).prop_map({
                let text = text.clone();
                move |(i, b)| {
                    let mut bytes = text.clone().into_bytes();
                    if let Some(c) = bytes.get_mut(i) {
                        *c = b;
                    }
                    String::from_utf8_lossy(&bytes).into_owned()
                }
            }),
            1 => "\\PC{0,100}",
        ]
    })
}

/// What `VaultHttp` does with a 200 answer, then `read`.
fn read<T>(body: &str, read: impl FnOnce(Value) -> Result<T, CaError>) -> Result<T, CaError> {
    let answer = Answer {
        status: 200,
        body: body.to_string(),
    };
    parse_json(&answer, "POST", "https://vault.test:8200/v1/x").and_then(read)
}

fn assert_bad_answer(e: &CaError) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(e, CaError::BadAnswer(_)),
        "not a bad answer: {e:?}"
    );
    prop_assert!(!e.message().is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A login answer: a token that can be sent back and a bounded lease,
    /// or a bad answer.
    #[test]
    fn any_login_answer_gets_a_token_or_a_bad_answer(
        body in prop_oneof![body(login_json()), body(any_json())],
        exp in any::<i64>(),
    ) {
        match read(&body, login_answer) {
            Ok(auth) => {
                prop_assert!(!auth.client_token.is_empty());
                prop_assert!(reqwest::header::HeaderValue::from_str(&auth.client_token).is_ok());
                prop_assert!(auth.lease() <= MAX_LEASE);
                // What the login then computes from it.
                let now = Instant::now();
                let until = cache_until(now, auth.lease(), Some((exp, 1_700_000_000)));
                prop_assert!(until <= now + auth.lease());
                let _ = auth.is_batch();
            }
            Err(e) => assert_bad_answer(&e)?,
        }
    }

    /// A sign answer: a certificate, then a chain (or an error saying what
    /// is wrong with it), or a bad answer.
    #[test]
    fn any_sign_answer_gets_its_fields_or_a_bad_answer(
        body in prop_oneof![body(sign_json()), body(any_json())],
    ) {
        match read(&body, |v| sign_answer(v, "https://vault.test:8200")) {
            Ok((certificate, data)) => {
                match chain_from_sign_answer(
                    &certificate,
                    data.issuing_ca.as_deref(),
                    data.ca_chain.as_deref(),
                ) {
                    Ok(chain) => prop_assert!(!chain.chain_pem.is_empty()),
                    Err(m) => prop_assert!(!m.is_empty()),
                }
            }
            Err(e) => assert_bad_answer(&e)?,
        }
    }

    /// An issuer list: at most MAX_ISSUERS IDs, each safe in a URL path, or
    /// a bad answer.
    #[test]
    fn any_issuer_list_gets_plain_ids_or_a_bad_answer(
        body in prop_oneof![body(issuers_json()), body(any_json())],
    ) {
        match read(&body, |v| issuer_ids(&v)) {
            Ok(ids) => {
                prop_assert!(ids.len() <= MAX_ISSUERS);
                for id in ids {
                    prop_assert!(!id.is_empty() && id.len() <= 128);
                    prop_assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{id:?}");
                }
            }
            Err(e) => assert_bad_answer(&e)?,
        }
    }
}

/// The genuine answers pass (the strategies above start from them).
#[test]
fn genuine_answers_are_read() {
    let login =
        json!({"auth": {"client_token": "s.abc", "lease_duration": 3600, "token_type": "service"}});
    let auth = read(&login.to_string(), login_answer).unwrap();
    assert_eq!(auth.client_token, "s.abc");
    assert_eq!(auth.lease(), Duration::from_secs(3600));
    let (leaf, root) = pems();
    let sign = json!({"data": {"certificate": leaf, "issuing_ca": root, "ca_chain": [root]}});
    let (certificate, data) =
        read(&sign.to_string(), |v| sign_answer(v, "https://vault.test")).unwrap();
    let chain = chain_from_sign_answer(&certificate, data.issuing_ca.as_deref(), None).unwrap();
    assert_eq!(chain.roots_pem.len(), 1);
    let list = json!({"data": {"keys": ["79d6da38-060f-bbf5-0ce4-b305c7bc6958"]}});
    assert_eq!(
        read(&list.to_string(), |v| issuer_ids(&v)).unwrap().len(),
        1
    );
    // A lease no Vault gives, and a token no header can carry: bad answers.
    for auth in [
        json!({"client_token": "s.abc", "lease_duration": u64::MAX}),
        json!({"client_token": "s.a\nb", "lease_duration": 60}),
    ] {
        let Err(e) = read(&json!({ "auth": auth }).to_string(), login_answer) else {
            panic!("{auth} was read as a login");
        };
        assert!(matches!(e, CaError::BadAnswer(_)), "{e:?}");
    }
}

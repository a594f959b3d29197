//! Tests of one StreamSecrets stream (src/sds/stream.rs): how requests are
//! classified, and properties of any sequence of requests.

use super::*;

mod classify {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn requests_are_classified_by_nonce_names_as_a_set_and_error_detail() {
        let served = ResourceNames::parse(&names(&["default", "ROOTCA"]), 8).unwrap();
        let last = Some("n1");
        let c = |nonce: &str, req: &[&str], nack: bool| {
            classify(last, &served, nonce, &names(req), nack)
        };
        assert_eq!(c("", &["default"], false), Kind::Subscribe);
        assert_eq!(c("n0", &["default", "ROOTCA"], false), Kind::Stale);
        assert_eq!(c("n0", &["default"], true), Kind::Stale);
        assert_eq!(c("n1", &["default", "ROOTCA"], false), Kind::Ack);
        // Order and repeats do not make a new subscription.
        assert_eq!(c("n1", &["ROOTCA", "default", "ROOTCA"], false), Kind::Ack);
        assert_eq!(c("n1", &["ROOTCA", "default"], true), Kind::Nack);
        assert_eq!(c("n1", &["default"], false), Kind::Subscribe);
        assert_eq!(c("n1", &["default"], true), Kind::NackAndSubscribe);
        // Nothing was sent yet: any nonce is stale.
        assert_eq!(
            classify(
                None,
                &ResourceNames::default(),
                "x",
                &names(&["default"]),
                false
            ),
            Kind::Stale
        );
    }
}

mod props {
    use super::*;
    use crate::ca::local::LocalCa;
    use crate::config::SdsLimits;
    use crate::crypto::KeyType;
    use crate::driver::Event;
    use crate::endpoint::connection::Connection;
    use crate::endpoint::credential::CredentialSource;
    use crate::endpoint::limits::Limits;
    use crate::endpoint::Endpoint;
    use crate::identity::Credential;
    use crate::sds::service::{SdsService, XdsStream};
    use crate::secrets::ManagerOptions;
    use crate::secrets::SecretManager;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::sync::OnceLock;
    use std::time::Duration;
    use tokio::sync::watch;

    fn jwt() -> Credential {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine;
        Credential::new(format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"system:serviceaccount:p:q"}"#)
        ))
    }

    type World = (
        tokio::runtime::Runtime,
        Arc<SdsService>,
        watch::Sender<bool>,
    );

    /// One runtime and one service (a local CA) for every case.
    fn world() -> &'static World {
        static WORLD: OnceLock<World> = OnceLock::new();
        WORLD.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (tx, rx) = watch::channel(false);
            let service = rt.block_on(async {
                let ca = Arc::new(LocalCa::new(None, "cluster.local").unwrap());
                let trust =
                    crate::trust::TrustBundle::start(ca.clone(), Default::default()).unwrap();
                let manager = SecretManager::new(
                    ca,
                    trust,
                    ManagerOptions::new(
                        "cluster.local",
                        KeyType::EcP256,
                        Duration::from_secs(3600),
                    ),
                );
                Arc::new(SdsService {
                    manager,
                    token_file: None,
                    endpoint: Endpoint::new(Limits::new(SdsLimits::default()), None, rx),
                })
            });
            (rt, service, tx)
        })
    }

    fn request_strategy() -> impl Strategy<Value = (DiscoveryRequest, u8)> {
        (
            prop_oneof![
                Just(String::new()),
                Just(resources::SECRET_TYPE_URL.to_string()),
                ".{0,30}"
            ],
            prop::collection::vec(
                prop_oneof![
                    Just("default".to_string()),
                    Just("ROOTCA".to_string()),
                    ".{0,10}"
                ],
                0..12,
            ),
            0u8..3, // nonce: none, the last one sent, or made up
            ".{0,10}",
            prop::option::of((any::<i32>(), ".{0,40}")),
        )
            .prop_map(|(type_url, names, nonce_kind, nonce, error)| {
                (
                    DiscoveryRequest {
                        type_url,
                        resource_names: names,
                        response_nonce: nonce,
                        error_detail: error.map(|(code, message)| RpcStatus {
                            code,
                            message,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    nonce_kind,
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any sequence of requests on a subscribed stream: no panic, and
        /// everything sent back is a response or a status the client caused.
        #[test]
        fn any_requests_on_a_stream_get_typed_answers(
            reqs in prop::collection::vec(request_strategy(), 1..8)
        ) {
            let (rt, service, _shutdown) = world();
            rt.block_on(async {
                let conn = Arc::new(Connection::new(1, service.limits().config()));
                let (tx, rx) = crate::endpoint::responses::with_room(64);
                let driver = Driver::new(
                    1,
                    &SURFACE,
                    service.manager.clone(),
                    &service.endpoint,
                    conn,
                    CredentialSource::Header(jwt()),
                    crate::endpoint::unproven::Proof::new(),
                );
                let mut s = <SdsStream as XdsStream>::new(driver, SdsLimits::default().max_resource_names, tx);
                // Subscribed first, so that ACKs, NACKs and pushes are reachable.
                let first = DiscoveryRequest {
                    resource_names: vec!["default".into()],
                    ..Default::default()
                };
                assert!(matches!(s.answer(first).await, Step::Continue));
                let what = ResourceNames::default();
                assert!(matches!(s.driver.next(&what).await, Event::Fetched { new_identity: true }));
                assert!(matches!(Protocol::send(&mut s, Some(true)).await, Step::Continue));
                for (mut req, nonce_kind) in reqs {
                    match nonce_kind {
                        0 => req.response_nonce.clear(),
                        1 => req.response_nonce = s.last_nonce.clone().unwrap_or_default(),
                        _ => {}
                    }
                    if let Step::End = s.answer(req).await {
                        break;
                    }
                    // A changed subscription of this credential is served at once;
                    // nothing may be left waiting on the CA.
                    prop_assert!(!s.driver.waiting());
                }
                drop(s);
                while let Some(item) = rx.take() {
                    if let Err(status) = *item {
                        prop_assert!(
                            matches!(status.code(), tonic::Code::InvalidArgument),
                            "{status:?}"
                        );
                    }
                }
                Ok(())
            })?;
        }

        #[test]
        fn classify_never_panics(
            last in prop::option::of(".{0,5}"),
            nonce in ".{0,5}",
            requested in prop::collection::vec(".{0,8}", 0..5),
            nack in any::<bool>(),
        ) {
            let served = ResourceNames::parse(&["default".to_string()], 8).unwrap();
            let kind = classify(last.as_deref(), &served, &nonce, &requested, nack);
            if nonce.is_empty() {
                prop_assert_eq!(kind, Kind::Subscribe);
            }
        }
    }
}

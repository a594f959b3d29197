//! Tests of the request reader (src/endpoint/framing.rs): framing, budgets and
//! deadlines, and properties of any split of the bytes.

use super::*;

impl Request for envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {}

mod reader {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use http_body::Frame;

    type Item = Result<Frame<Bytes>, Status>;

    fn reader(
        max: usize,
        budget: usize,
    ) -> (
        tokio::sync::mpsc::Sender<Item>,
        RequestReader,
        Arc<Semaphore>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let body = Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let budget = Arc::new(Semaphore::new(budget));
        let r = RequestReader::new(body, budget.clone(), max, Duration::from_secs(5));
        (tx, r, budget)
    }

    fn framed(msg: &DiscoveryRequest) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut v = vec![0];
        v.extend((body.len() as u32).to_be_bytes());
        v.extend(body);
        v
    }

    fn data(b: &[u8]) -> Item {
        Ok(Frame::data(Bytes::copy_from_slice(b)))
    }

    fn req(names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn messages_split_and_joined_across_frames_and_memory_given_back() {
        let (tx, mut r, budget) = reader(1024, 4096);
        let (a, b) = (
            framed(&req(&["default"])),
            framed(&req(&["ROOTCA", "default"])),
        );
        let mut all = a.clone();
        all.extend(&b);
        // One byte at a time for the first, then the rest in one frame.
        for byte in &all[..a.len()] {
            tx.send(data(&[*byte])).await.unwrap();
        }
        tx.send(data(&all[a.len()..])).await.unwrap();
        let m: DiscoveryRequest = r.message().await.unwrap().unwrap();
        assert_eq!(m.resource_names, ["default"]);
        let m: DiscoveryRequest = r.message().await.unwrap().unwrap();
        assert_eq!(m.resource_names, ["ROOTCA", "default"]);
        assert_eq!(r.msg.kept.capacity(), 0, "nothing kept between messages");
        assert_eq!(budget.available_permits(), 4096);
        drop(tx);
        assert!(r.message::<DiscoveryRequest>().await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_is_a_client_gone_not_a_half_close() {
        let (tx, mut r, budget) = reader(1024, 4096);
        let m = framed(&req(&["default"]));
        tx.send(data(&m[..8])).await.unwrap();
        tx.send(Err(Status::cancelled("reset"))).await.unwrap();
        let e = r.message::<DiscoveryRequest>().await.unwrap_err();
        assert!(matches!(e, FramingError::Gone), "{e:?}");
        assert_eq!(e.code(), Code::Cancelled);
        drop(r);
        assert_eq!(budget.available_permits(), 4096);
        // A half-close is the end of the requests, not an error.
        let (tx, mut r, _) = reader(1024, 4096);
        drop(tx);
        assert!(r.message::<DiscoveryRequest>().await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_message_is_refused_from_its_header() {
        let (tx, mut r, _) = reader(100, 4096);
        let mut prefix = vec![0];
        prefix.extend(16_000_000u32.to_be_bytes());
        tx.send(data(&prefix)).await.unwrap();
        let e = r.message::<DiscoveryRequest>().await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("SDS_MAX_REQUEST_BYTES=100"), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_is_invalid_argument_and_compression_unimplemented() {
        let (tx, mut r, _) = reader(100, 4096);
        tx.send(data(&[0, 0, 0, 0, 3, 0xff, 0xff, 0xff]))
            .await
            .unwrap();
        let e = r.message::<DiscoveryRequest>().await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let (tx, mut r, _) = reader(100, 4096);
        tx.send(data(b"GET / HTTP/1.1\r\n")).await.unwrap();
        assert_eq!(
            r.message::<DiscoveryRequest>().await.unwrap_err().code(),
            Code::InvalidArgument
        );
        let (tx, mut r, _) = reader(100, 4096);
        tx.send(data(&[1, 0, 0, 0, 1, 0])).await.unwrap();
        assert_eq!(
            r.message::<DiscoveryRequest>().await.unwrap_err().code(),
            Code::Unimplemented
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_for_the_first_message_and_for_a_started_one() {
        // Nothing at all.
        let (_tx, mut r, _) = reader(100, 4096);
        let t = Instant::now();
        let e = r.message::<DiscoveryRequest>().await.unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded);
        assert!(e.message().contains("SDS_FIRST_REQUEST_TIMEOUT"), "{e:?}");
        assert_eq!(t.elapsed(), Duration::from_secs(5));

        // A first message, then silence (fine), then half a message (not).
        let (tx, mut r, budget) = reader(100, 4096);
        tx.send(data(&framed(&req(&["default"])))).await.unwrap();
        r.message::<DiscoveryRequest>().await.unwrap().unwrap();
        let quiet =
            tokio::time::timeout(Duration::from_secs(3600), r.message::<DiscoveryRequest>()).await;
        assert!(quiet.is_err(), "an idle stream is not cut off");
        let half = framed(&req(&["default"]));
        tx.send(data(&half[..4])).await.unwrap();
        let t = Instant::now();
        let e = r.message::<DiscoveryRequest>().await.unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded);
        assert_eq!(t.elapsed(), Duration::from_secs(5));
        drop(r);
        assert_eq!(
            budget.available_permits(),
            4096,
            "a dropped reader gives its budget back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_shared_budget_makes_readers_wait() {
        let budget = Arc::new(Semaphore::new(16));
        let (tx1, rx1) = tokio::sync::mpsc::channel::<Item>(4);
        let (tx2, rx2) = tokio::sync::mpsc::channel::<Item>(4);
        let mk = |rx, timeout_s| {
            RequestReader::new(
                Body::new(http_body_util::StreamBody::new(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                )),
                budget.clone(),
                100,
                Duration::from_secs(timeout_s),
            )
        };
        let (mut r1, mut r2) = (mk(rx1, 2), mk(rx2, 5));
        let m = framed(&req(&["default"]));
        assert_eq!(m.len(), 14, "fits the budget, but not twice");
        // r1 takes its whole message's 14 bytes of budget with the first 12.
        tx1.send(data(&m[..12])).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), r1.message::<DiscoveryRequest>())
                .await
                .is_err()
        );
        assert_eq!(budget.available_permits(), 2);
        // r2's 8 bytes must wait; when r1 times out and is dropped, r2 goes on.
        tx2.send(data(&m[..8])).await.unwrap();
        tx2.send(data(&m[8..])).await.unwrap();
        let r2_read = tokio::spawn(async move { r2.message::<DiscoveryRequest>().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!r2_read.is_finished(), "waits for budget");
        assert_eq!(
            r1.message::<DiscoveryRequest>().await.unwrap_err().code(),
            Code::DeadlineExceeded
        );
        drop(r1);
        let got = r2_read
            .await
            .unwrap()
            .expect("served once r1 gave its budget back");
        assert_eq!(got.unwrap().resource_names, ["default"]);
        assert_eq!(budget.available_permits(), 16);
    }

    /// Every field the agent reads survives decoding without the node, and
    /// the node (Envoy's ~60 KiB of extensions) is skipped.
    /// Readers that each have half a message never wait on each other: the
    /// first to see its prefix takes the whole message's budget, the other
    /// waits holding nothing. (Taken a chunk at a time, both held half the
    /// budget and waited for the other's half until their deadlines.)
    #[tokio::test(start_paused = true)]
    async fn readers_with_half_a_message_each_all_finish() {
        let m = framed(&req(&["default"]));
        assert_eq!(m.len(), 14);
        let budget = Arc::new(Semaphore::new(20));
        let mut readers = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = tokio::sync::mpsc::channel::<Item>(4);
            readers.push(RequestReader::new(
                Body::new(http_body_util::StreamBody::new(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                )),
                budget.clone(),
                100,
                Duration::from_secs(5),
            ));
            tx.send(data(&m[..8])).await.unwrap();
            senders.push(tx);
        }
        let start = Instant::now();
        let tasks: Vec<_> = readers
            .into_iter()
            .map(|mut r| tokio::spawn(async move { r.message::<DiscoveryRequest>().await }))
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        for tx in &senders {
            tx.send(data(&m[8..])).await.unwrap();
        }
        for t in tasks {
            let got = t.await.unwrap().expect("read before any deadline");
            assert_eq!(got.unwrap().resource_names, ["default"]);
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(budget.available_permits(), 20);
    }
}

mod props {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use http_body::Frame;
    use proptest::prelude::*;

    /// Feeds `chunks` to a reader and collects what it makes of them.
    fn read_all(
        chunks: Vec<Vec<u8>>,
        max: usize,
    ) -> Vec<Result<Option<DiscoveryRequest>, FramingError>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let frames: Vec<Result<Frame<Bytes>, Status>> = chunks
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from(c))))
                .collect();
            let body = Body::new(http_body_util::StreamBody::new(futures::stream::iter(
                frames,
            )));
            let budget = Arc::new(Semaphore::new(1 << 20));
            let mut r = RequestReader::new(body, budget.clone(), max, Duration::from_secs(5));
            let mut out = Vec::new();
            loop {
                let m = r.message::<DiscoveryRequest>().await;
                let done = !matches!(m, Ok(Some(_)));
                out.push(m);
                if done {
                    break;
                }
            }
            drop(r);
            assert_eq!(budget.available_permits(), 1 << 20, "budget given back");
            out
        })
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend((body.len() as u32).to_be_bytes());
        v.extend(body);
        v
    }

    proptest! {
        /// Arbitrary bytes, in arbitrary frames: never a panic; every
        /// outcome is a message, the end, or a status a client can act on.
        #[test]
        fn arbitrary_bytes_get_a_typed_answer(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20),
            max in 1usize..2048,
        ) {
            for r in read_all(chunks, max) {
                if let Err(s) = r {
                    prop_assert!(
                        matches!(
                            s.code(),
                            Code::InvalidArgument | Code::ResourceExhausted | Code::Unimplemented
                        ),
                        "{s:?}"
                    );
                }
            }
        }

        /// Well-framed messages of arbitrary content: each decodes or is
        /// INVALID_ARGUMENT, whatever the framing splits.
        #[test]
        fn framed_arbitrary_messages(
            bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..5),
            split in 1usize..64,
        ) {
            let all: Vec<u8> = bodies.iter().flat_map(|b| framed(b)).collect();
            let chunks: Vec<Vec<u8>> = all.chunks(split).map(<[u8]>::to_vec).collect();
            let out = read_all(chunks, 4096);
            for (i, r) in out.iter().enumerate() {
                match r {
                    Ok(Some(_)) => prop_assert!(i < bodies.len()),
                    Ok(None) => prop_assert_eq!(i, bodies.len()),
                    Err(s) => prop_assert_eq!(s.code(), Code::InvalidArgument),
                }
            }
        }

        /// Real requests of arbitrary content round-trip.
        #[test]
        fn real_requests_round_trip(
            names in prop::collection::vec(".{0,20}", 0..10),
            nonce in ".{0,20}",
            split in 1usize..64,
        ) {
            let req = DiscoveryRequest {
                resource_names: names,
                response_nonce: nonce,
                ..Default::default()
            };
            let all = framed(&req.encode_to_vec());
            let chunks: Vec<Vec<u8>> = all.chunks(split).map(<[u8]>::to_vec).collect();
            let out = read_all(chunks, 4096);
            prop_assert_eq!(out.len(), 2);
            prop_assert_eq!(out[0].as_ref().unwrap().as_ref().unwrap(), &req);
        }
    }
}

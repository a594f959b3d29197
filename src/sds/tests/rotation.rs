//! A renewal is pushed to the streams open on its identity, at the renewal
//! point of the manager's policy (half of [`TTL`]) and not before.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_renewal_is_pushed_to_open_streams_at_its_time_and_not_before() {
    let agent = Agent::start(|_| {}).await;
    let mut client = agent.client().await;
    let x = jwt("x", None);
    let mut sotw = open_sotw(&mut client, &x).await.unwrap();
    let mut delta = open_delta(&mut client, &x).await.unwrap();
    sotw.send(request(&["default", "ROOTCA"], None)).await;
    let first = sotw.response().await;
    delta.send(delta_request(&["default", "ROOTCA"], "")).await;
    let first_delta = delta.response().await;
    assert_eq!(delta_names(&first_delta), ["default", "ROOTCA"]);
    assert_eq!(serial(&first), delta_serial(&first_delta), "one identity");
    sotw.send(request(&["default", "ROOTCA"], Some(&first)))
        .await;
    delta.send(delta_request(&[], &first_delta.nonce)).await;
    let start = tokio::time::Instant::now();

    // Negative control: nothing before the renewal point.
    tokio::time::advance(RENEWAL - Duration::from_secs(30)).await;
    sotw.silent(QUIET, "StreamSecrets before the renewal").await;
    delta.silent(QUIET, "DeltaSecrets before the renewal").await;
    assert_eq!(agent.ca.signs(), 1);

    tokio::time::advance(Duration::from_secs(30)).await;
    let renewed = sotw.response().await;
    let renewed_delta = delta.response().await;
    assert!(start.elapsed() >= RENEWAL - Duration::from_secs(30));
    assert_eq!(agent.ca.signs(), 2);
    assert_ne!(serial(&renewed), serial(&first), "the new certificate");
    assert_ne!(renewed.version_info, first.version_info);
    assert_ne!(renewed.nonce, first.nonce);
    assert_ne!(
        chain_and_key(&secret_named(&renewed, "default")),
        chain_and_key(&secret_named(&first, "default")),
        "a new certificate and key"
    );
    assert_eq!(
        trusted_ca(&secret_named(&renewed, "ROOTCA")),
        trusted_ca(&secret_named(&first, "ROOTCA")),
        "the same root"
    );
    assert!(agent.log().contains("renewed workload certificate"));
    assert_eq!(serial(&renewed), delta_serial(&renewed_delta));
    // StreamSecrets sends its whole subscription; DeltaSecrets only what
    // changed (the roots did not).
    assert_eq!(names(&renewed), ["default", "ROOTCA"]);
    assert_eq!(delta_names(&renewed_delta), ["default"]);

    // And the next renewal, after ACKs, the same way.
    sotw.send(request(&["default", "ROOTCA"], Some(&renewed)))
        .await;
    delta.send(delta_request(&[], &renewed_delta.nonce)).await;
    tokio::time::advance(RENEWAL).await;
    let again = sotw.response().await;
    assert_ne!(serial(&again), serial(&renewed));
    assert_eq!(delta_serial(&delta.response().await), serial(&again));
}

//! Attacks that would each cost the CA a login if passed on: workloads past
//! MAX_IDENTITIES, and a flood of forged JWTs on one connection. The agent
//! must refuse them before the CA is asked, beyond the budgets it documents.

use crate::support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::agent::Agent;
use support::attack::*;
use support::sds_client::*;
use tonic::Code;

use super::{assert_one_warning_per_interval, check_rss, local_agent, Legit};

/// Workloads past MAX_IDENTITIES (here 2), each with a valid JWT of its
/// own: a new identity's stream and fetch are refused with
/// RESOURCE_EXHAUSTED naming the setting, the CA is not asked, the two
/// identities already cached keep being served on their open streams and on
/// new ones, and the refusals are logged once per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_past_max_identities_are_refused() {
    let agent = local_agent(&[("MAX_IDENTITIES", "2")]);
    // The two identities the agent holds, each on a stream of its own.
    let mut held = Vec::new();
    for sa in ["one", "two"] {
        let jwt = fake_jwt("held", sa);
        let mut client = connect(&agent.socket).await;
        let (tx, mut inbound) = open_stream(&mut client, &jwt).await;
        tx.send(request(&["default"], None)).await.unwrap();
        let first = next_within(&mut inbound, Duration::from_secs(10), "held stream", || {
            agent.log()
        })
        .await
        .unwrap_or_else(|e| panic!("{sa} was not served: {e:?}\n{}", agent.log()));
        assert_eq!(
            served_uris(&first),
            [format!("spiffe://cluster.local/ns/held/sa/{sa}")]
        );
        held.push((client, jwt, tx, inbound, first));
    }
    let m = support::metrics::scrape(&agent.status_url("/metrics"), "prometheus").await;
    let sign_ok = [("kind", "sign"), ("outcome", "ok")];
    let signed_before = m.get("node_agent_ca_requests_total", &sign_ok);
    assert_eq!(signed_before, 2.0);

    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();
    // A third identity, again and again: on new streams and by FetchSecrets.
    // Each time on a new connection: a JWT the CA never proved spends a
    // token of its connection's budget at each try, and this test is about
    // MAX_IDENTITIES, not that budget.
    let third = fake_jwt("attacker", "third");
    for _ in 0..50 {
        let mut client = connect(&agent.socket).await;
        let (tx, mut inbound) = open_stream(&mut client, &third).await;
        tx.send(request(&["default"], None)).await.unwrap();
        let e = next_within(
            &mut inbound,
            Duration::from_secs(10),
            "third identity",
            || agent.log(),
        )
        .await
        .expect_err("a third identity is refused on a stream");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message()
                .contains("this agent already serves 2 identities (MAX_IDENTITIES)"),
            "{e:?}"
        );
        let e = fetch(&mut client, &["default"], &third)
            .await
            .expect_err("a third identity is refused by FetchSecrets");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("(MAX_IDENTITIES)"), "{e:?}");
    }
    let elapsed = started.elapsed();

    // The two held identities are served: on their open streams (a changed
    // subscription answered) and on new connections.
    for (_, jwt, tx, inbound, first) in &mut held {
        tx.send(request(&["default", "ROOTCA"], Some(first)))
            .await
            .unwrap();
        let resp = next_within(inbound, Duration::from_secs(10), "held stream", || {
            agent.log()
        })
        .await
        .unwrap_or_else(|e| panic!("an open stream was not served: {e:?}\n{}", agent.log()));
        assert_eq!(secrets(&resp).len(), 2);
        let mut fresh = connect(&agent.socket).await;
        let resp = fetch(&mut fresh, &["default"], jwt)
            .await
            .unwrap_or_else(|e| panic!("a held identity was not served: {e:?}\n{}", agent.log()));
        assert_eq!(served_uris(&resp), served_uris(first));
    }
    // The CA signed nothing for the third; the cache holds two.
    let m = support::metrics::scrape(&agent.status_url("/metrics"), "prometheus").await;
    assert_eq!(
        m.get("node_agent_ca_requests_total", &sign_ok),
        signed_before,
        "the CA was not asked for the third identity"
    );
    assert_eq!(m.get("node_agent_identities_cached", &[]), 2.0);
    assert!(
        m.get(
            "node_agent_sds_requests_refused_total",
            &[("reason", "limits")]
        ) >= 100.0
    );
    check_rss(rss.stop(), "identities past MAX_IDENTITIES");
    assert_one_warning_per_interval(&agent, "MAX_IDENTITIES", elapsed);
}

/// One connection presents forged JWTs, each new (a Vault login and a
/// TokenReview each, were they all passed on), ten at once and then a
/// hundred in a row. Counted at OpenBao: only the connection's budget
/// reaches it (SDS_CONNECTION_NEW_JWT_BURST, then one per interval), never
/// more than SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT at once; the rest are
/// refused with RESOURCE_EXHAUSTED without asking Vault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_flood_with_forged_jwts_is_bounded_per_connection() {
    use support::vault_env::VaultEnv;
    use support::vault_front::{Tamper, VaultFront};

    let env = VaultEnv::start().await;
    // A front that slows Vault (so that logins overlap) and counts what is
    // in flight.
    let front = VaultFront::start(
        env.bao.addr(),
        env.bao.client().clone(),
        Tamper::None,
        Duration::from_secs(1),
    )
    .await;
    let agent = Agent::start(&env.agent_env_with(&[
        ("VAULT_ADDR", front.url.as_str()),
        ("CA_ADDR", front.url.as_str()),
    ]));
    let legit = Legit::start(&agent, env.jwt("default", "httpbin")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while legit.served.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logins_before = env.count("auth/kubernetes/login");
    let reviews_before = env.review.reviews();
    front.stats.max_in_flight.store(0, Ordering::SeqCst);

    let rss = RssSampler::start(agent.pid());
    let started = Instant::now();
    let forger = support::k8s::TestIssuer::generate().unwrap();
    let forged = || forger.mint("default", "httpbin", Duration::from_secs(3600));
    let client = connect(&agent.socket).await;
    let mut outcomes = Vec::new();
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let (mut c, jwt) = (client.clone(), forged());
            tokio::spawn(async move { fetch(&mut c, &["default"], &jwt).await })
        })
        .collect();
    for b in burst {
        outcomes.push(b.await.unwrap().unwrap_err());
    }
    // Only the attacker's logins reach Vault meanwhile: the legitimate
    // workload's certificate and token are cached.
    let most_at_once = front.stats.max_in_flight.load(Ordering::SeqCst);
    for _ in 0..100 {
        let mut c = client.clone();
        outcomes.push(fetch(&mut c, &["default"], &forged()).await.unwrap_err());
    }
    let elapsed = started.elapsed();
    let (mut denied, mut in_flight, mut rate) = (0, 0, 0);
    for e in &outcomes {
        match e.code() {
            Code::PermissionDenied => denied += 1,
            Code::ResourceExhausted
                if e.message()
                    .contains("SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT=2") =>
            {
                in_flight += 1
            }
            Code::ResourceExhausted if e.message().contains("SDS_CONNECTION_NEW_JWT_BURST=4") => {
                rate += 1
            }
            _ => panic!("unexpected {e:?}"),
        }
    }
    println!("forged JWTs: {denied} refused by Vault, {in_flight} past the logins in flight, {rate} past the rate");
    let attacker_logins = env.count("auth/kubernetes/login") - logins_before;
    assert_eq!(
        attacker_logins, denied,
        "Vault saw exactly the admitted ones"
    );
    assert_eq!(env.review.reviews() - reviews_before, denied as u64);
    let budget = 4 + elapsed.as_secs() as usize / 10;
    assert!(
        denied >= 4 && denied <= budget,
        "{denied} logins in {elapsed:?}; the budget was {budget}"
    );
    assert!(in_flight >= 1, "ten at once pass the logins in flight");
    assert!(
        most_at_once <= 2,
        "{most_at_once} at Vault at once; SDS_CONNECTION_MAX_LOGINS_IN_FLIGHT is 2"
    );
    check_rss(rss.stop(), "login flood");
    legit.stop(&agent).await;
    assert_one_warning_per_interval(&agent, "SDS_CONNECTION_NEW_JWT_BURST", elapsed);

    // After: a workload on a connection of its own is served.
    let mut c = connect(&agent.socket).await;
    let resp = fetch(&mut c, &["default"], &env.jwt("default", "sleep"))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
    assert_eq!(
        served_uris(&resp),
        ["spiffe://cluster.local/ns/default/sa/sleep"]
    );
}

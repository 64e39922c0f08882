//! No lost usage (ARCHITECTURE.md's invariants): Redis stops while the gateway serves requests (in waves,
//! or under steady load while the aggregator consumes); the gateway keeps relaying for the key
//! it has seen, and once Redis is back every event arrives and is counted exactly once. A Redis
//! that comes back empty still gets the spooled events; what it held is lost.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;
use tests::harness::{Pipeline, RedisServer, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_while_200_requests_are_served_loses_no_event() {
    let mut redis = RedisServer::start();
    let p = Pipeline::start_with(&redis.url(), |_| {}).await;
    p.add_account("anthropic").await;
    let (_, secret) = p.add_key(json!({"name": "outage"})).await;
    let send = |i: usize| {
        let (p, secret) = (&p, &secret);
        async move {
            let response = p.messages(secret)
                .json(
                    &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": i.is_multiple_of(2),
                              "messages": [], "mock": {"input_tokens": 10, "output_tokens": 2}}),
                )
                .send()
                .await
                .unwrap();
            let status = response.status();
            // Read to the end: a client that leaves early is (rightly) billed for less.
            response.bytes().await.unwrap();
            status
        }
    };
    assert_eq!(
        send(1).await,
        200,
        "warm-up: the key is now known to the gateway"
    );

    redis.stop();
    let mut served = 0;
    for wave in 0..10 {
        let statuses = join_all((0..20).map(|i| send(wave * 20 + i))).await;
        served += statuses.iter().filter(|s| s.as_u16() == 200).count();
    }
    assert_eq!(served, 200, "every request is served while Redis is down");
    redis.restart();

    eventually(Duration::from_secs(30), || async {
        let usage = p.try_usage("").await?;
        (usage["rows"][0]["requests"].as_i64()? >= 201).then_some(())
    })
    .await;
    // Late duplicates would show up as more than 201 after a while.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let usage = p.usage("").await;
    let row = &usage["rows"][0];
    assert_eq!(row["requests"], 201);
    assert_eq!(row["input_tokens"], 2010);
    assert_eq!(row["output_tokens"], 402);
    assert_eq!(row["errors"], 0);
}

/// Statuses of the requests a load task has sent so far.
#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    ok: AtomicUsize,
}

/// Sends requests one after another (streamed and not, alternately) until `stop` is set.
async fn steady_load(p: &Pipeline, secret: &str, tally: &Tally, stop: &AtomicBool) {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let response = p
            .messages(secret)
            .json(
                &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": i.is_multiple_of(2),
                          "messages": [], "mock": {"input_tokens": 10, "output_tokens": 2}}),
            )
            .send()
            .await
            .unwrap();
        let ok = response.status() == 200;
        response.bytes().await.unwrap();
        tally.sent.fetch_add(1, Ordering::Relaxed);
        if ok {
            tally.ok.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
    }
}

async fn ready(p: &Pipeline) -> bool {
    let response = p.http.get(p.gateway_url("/readyz")).send().await;
    response.is_ok_and(|r| r.status() == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_steady_load_loses_and_duplicates_nothing() {
    let mut redis = RedisServer::start();
    let p = Pipeline::start_with(&redis.url(), |_| {}).await;
    p.add_account("anthropic").await;
    let (_, secret) = p.add_key(json!({"name": "steady"})).await;
    let (tally, stop) = (Tally::default(), AtomicBool::new(false));
    let sent_at_least = |n: usize| {
        let tally = &tally;
        move || async move { (tally.sent.load(Ordering::Relaxed) >= n).then_some(()) }
    };
    let phases = async {
        eventually(Duration::from_secs(20), sent_at_least(100)).await;
        redis.stop();
        let stopped_at = tally.sent.load(Ordering::Relaxed);
        eventually(Duration::from_secs(10), || async {
            (!ready(&p).await).then_some(())
        })
        .await;
        eventually(Duration::from_secs(20), sent_at_least(stopped_at + 100)).await;
        redis.restart();
        let restarted_at = tally.sent.load(Ordering::Relaxed);
        eventually(Duration::from_secs(10), || async {
            ready(&p).await.then_some(())
        })
        .await;
        eventually(Duration::from_secs(20), sent_at_least(restarted_at + 100)).await;
        stop.store(true, Ordering::Relaxed);
        (stopped_at, restarted_at)
    };
    let ((stopped_at, restarted_at), ()) =
        tokio::join!(phases, steady_load(&p, &secret, &tally, &stop));
    let sent = tally.sent.load(Ordering::Relaxed);
    println!(
        "steady load: {sent} requests, Redis down from request {stopped_at} to {restarted_at}"
    );
    assert_eq!(
        tally.ok.load(Ordering::Relaxed),
        sent,
        "every request was served"
    );

    let want = i64::try_from(sent).unwrap();
    eventually(Duration::from_secs(30), || async {
        let usage = p.try_usage("").await?;
        (usage["rows"][0]["requests"].as_i64()? >= want).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let usage = p.usage("").await;
    let row = &usage["rows"][0];
    assert_eq!(row["requests"], want);
    assert_eq!(row["input_tokens"], want * 10);
    assert_eq!(row["output_tokens"], want * 2);
    assert_eq!(row["errors"], 0);
}

/// A Redis without persistence comes back empty: what it held (keys, accounts, stats, the
/// stream and its consumer group) is gone, but the events the gateway spooled while it was down
/// are re-published to the new stream with their ids and counted by the aggregator, which
/// recreates its group. The key and the account must be created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_empty_gets_the_spooled_events_but_keys_and_stats_are_lost() {
    let mut redis = RedisServer::start();
    let p = Pipeline::start_with(&redis.url(), |args| args.cache_ttl_ms = Some(200)).await;
    p.add_account("anthropic").await;
    let (_, secret) = p.add_key(json!({"name": "amnesia"})).await;
    let send = || async {
        let response = p
            .messages(&secret)
            .json(
                &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [],
                          "mock": {"input_tokens": 10, "output_tokens": 2}}),
            )
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        response.bytes().await.unwrap();
        status
    };
    for _ in 0..10 {
        assert_eq!(send().await, 200);
    }
    eventually(Duration::from_secs(20), || async {
        let usage = p.try_usage("").await?;
        (usage["rows"][0]["requests"].as_i64()? == 10).then_some(())
    })
    .await;
    let before: Vec<String> = p.events().await.into_iter().map(|e| e.id).collect();

    redis.stop();
    for _ in 0..30 {
        assert_eq!(
            send().await,
            200,
            "a known key is served while Redis is down"
        );
    }
    redis.restart_empty();

    // The 30 spooled events arrive in the new, empty stream, and only those.
    let after = eventually(Duration::from_secs(30), || async {
        let usage = p.try_usage("").await?;
        (usage["rows"][0]["requests"].as_i64()? >= 30).then_some(())
    })
    .await;
    let () = after;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let usage = p.usage("").await;
    assert_eq!(
        usage["rows"][0]["requests"], 30,
        "the 10 earlier requests' stats are lost"
    );
    let events = p.events().await;
    assert_eq!(events.len(), 30);
    assert!(events.iter().all(|e| !before.contains(&e.id)));

    // Keys and accounts were only in Redis: the key is unknown once its cache entry expires.
    let status = eventually(Duration::from_secs(10), || async {
        let status = send().await;
        (status != 200).then_some(status)
    })
    .await;
    assert_eq!(status, 401);
    let (_, keys) = p.admin(reqwest::Method::GET, "/admin/keys", None).await;
    let (_, accounts) = p.admin(reqwest::Method::GET, "/admin/accounts", None).await;
    assert_eq!(
        (
            keys["data"].as_array().map(Vec::len),
            accounts["data"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );
}

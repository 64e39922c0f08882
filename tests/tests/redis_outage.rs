//! No lost usage (CONTRACT.md §7.3): Redis stops while the gateway serves 200 requests; the
//! gateway keeps relaying for the key it has seen, and once Redis is back every event arrives
//! and is counted exactly once.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

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
            let response = p
                .http
                .post(p.gateway_url("/v1/messages"))
                .header("x-api-key", secret)
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

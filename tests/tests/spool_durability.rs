//! The spool is durable by default: while Redis is down, the events it takes are fsynced before
//! the publisher moves on, so a host crash (not only a process crash) keeps them. The opt-out
//! (`--spool-fsync false`) writes without fsync. Both are seen on `/metrics`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use serde_json::json;
use tests::harness::{Pipeline, RedisServer, eventually, metric};

/// Serves 5 requests while Redis is down, waits until the gateway has spooled them, brings
/// Redis back and waits until all are counted; returns the spool fsyncs made while spooling.
async fn spool_fsyncs_during_an_outage(tweak: impl FnOnce(&mut gateway::Args)) -> u64 {
    let mut redis = RedisServer::start();
    let p = Pipeline::start_with(&redis.url(), tweak).await;
    p.add_account("anthropic").await;
    let (_, secret) = p.add_key(json!({"name": "durable"})).await;
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
    assert_eq!(send().await, 200, "warm-up: the key is now known");

    let before = metric::<u64>(&p.http, p.gateway, "meter_gateway_spool_fsyncs_total").await;
    redis.stop();
    for _ in 0..5 {
        assert_eq!(
            send().await,
            200,
            "a known key is served while Redis is down"
        );
    }
    eventually(Duration::from_secs(20), || async {
        (metric::<u64>(&p.http, p.gateway, "meter_gateway_events_spooled_total").await? >= 5)
            .then_some(())
    })
    .await;
    let fsyncs = metric::<u64>(&p.http, p.gateway, "meter_gateway_spool_fsyncs_total").await;

    redis.restart();
    eventually(Duration::from_secs(30), || async {
        let usage = p.try_usage("").await?;
        (usage["rows"][0]["requests"].as_i64()? >= 6).then_some(())
    })
    .await;
    let (Some(before), Some(after)) = (before, fsyncs) else {
        panic!("/metrics has no meter_gateway_spool_fsyncs_total");
    };
    after - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spooled_during_an_outage_are_fsynced_by_default() {
    let fsyncs = spool_fsyncs_during_an_outage(|_| {}).await;
    assert!(fsyncs >= 1, "{fsyncs} spool fsyncs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_fsync_can_be_turned_off() {
    let fsyncs = spool_fsyncs_during_an_outage(|args| args.spool_fsync = Some(false)).await;
    assert_eq!(fsyncs, 0);
}

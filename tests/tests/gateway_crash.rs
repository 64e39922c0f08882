//! A gateway that dies while Redis is down loses nothing: its events wait in the spool file and
//! the next gateway process on that spool re-publishes them (no lost usage).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use serde_json::{Value, json};
use tests::harness::{
    RedisServer, account_and_key, eventually, free_port, gateway_process, metric, spawn_aggregator,
    unique_stream, wait_ready,
};
use tests::mock_upstream::MockUpstream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spooled_by_a_killed_gateway_are_published_by_the_next_one() {
    let mut redis = RedisServer::start();
    let stream = unique_stream();
    let spool = std::env::temp_dir().join(format!("meter-crash-spool-{stream}"));
    let upstream = MockUpstream::spawn().await;
    let (aggregator, _stop) = spawn_aggregator(&redis.url(), &stream).await;
    let http = reqwest::Client::new();
    let port = free_port();
    let (gateway, addr) = gateway_process(&redis.url(), &stream, port, &spool, &[]);
    let base = format!("http://{addr}");
    wait_ready(&http, addr).await;
    let key = account_and_key(&http, addr, &upstream.base_url(), json!({"name": "k"})).await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let send = || async {
        let response = http
            .post(format!("{base}/v1/messages"))
            .header("x-api-key", &secret)
            .json(
                &json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [],
                          "mock": {"input_tokens": 7, "output_tokens": 3}}),
            )
            .send()
            .await
            .unwrap();
        let status = response.status();
        response.bytes().await.unwrap();
        status
    };
    assert_eq!(send().await, 200);

    redis.stop();
    for _ in 0..50 {
        assert_eq!(send().await, 200);
    }
    // Everything has left memory for the spool file.
    eventually(Duration::from_secs(20), || async {
        let pending = metric::<f64>(
            &http,
            format!("127.0.0.1:{port}"),
            "meter_gateway_events_pending",
        )
        .await?;
        let spooled = metric::<f64>(
            &http,
            format!("127.0.0.1:{port}"),
            "meter_gateway_spool_bytes",
        )
        .await?;
        (pending == 0.0 && spooled > 0.0).then_some(())
    })
    .await;
    gateway.kill();

    redis.restart();
    let (_next, _) = gateway_process(&redis.url(), &stream, port, &spool, &[]);
    let usage_url = format!("http://{aggregator}/v1/usage");
    let row = eventually(Duration::from_secs(30), || async {
        let usage: Value = http.get(&usage_url).send().await.ok()?.json().await.ok()?;
        let row = usage["rows"][0].clone();
        (row["requests"].as_i64()? >= 51).then_some(row)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let usage: Value = http
        .get(&usage_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["rows"][0]["requests"], 51, "{row}");
    assert_eq!(usage["rows"][0]["input_tokens"], 51 * 7);
    let _ = std::fs::remove_dir_all(&spool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_lease_held_by_a_killed_gateway_frees_within_its_ttl() {
    let stream = unique_stream();
    let upstream = MockUpstream::spawn().await;
    let http = reqwest::Client::new();
    let port = free_port();
    let spool = std::env::temp_dir().join(format!("meter-lease-spool-{stream}"));
    let redis_url = tests::harness::redis_url();
    let (doomed, addr) = gateway_process(
        redis_url,
        &stream,
        port,
        &spool,
        &[("GATEWAY_LEASE_TTL_MS", "2000".to_owned())],
    );
    let base = format!("http://{addr}");
    wait_ready(&http, addr).await;
    let key = account_and_key(
        &http,
        addr,
        &upstream.base_url(),
        json!({"name": "one", "max_concurrency": 1}),
    )
    .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let (survivor, _stop) = tests::harness::spawn_gateway(redis_url, &stream, |args| {
        args.lease_ttl_ms = Some(2000);
    })
    .await;
    let request = json!({"model": "claude-haiku-4-5", "max_tokens": 5, "stream": true, "messages": [],
                         "mock": {"chunk_delay_ms": 1000}});
    let mut holding = http
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", &secret)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(holding.status(), 200);
    holding.chunk().await.unwrap();
    let try_survivor = || {
        http.post(format!("http://{survivor}/v1/messages"))
            .header("x-api-key", &secret)
            .json(&json!({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []}))
            .send()
    };
    assert_eq!(
        try_survivor().await.unwrap().status(),
        429,
        "the slot is held by the other gateway"
    );

    doomed.kill();
    let killed_at = std::time::Instant::now();
    eventually(Duration::from_secs(10), || async {
        (try_survivor().await.ok()?.status() == 200).then_some(())
    })
    .await;
    let freed_after = killed_at.elapsed();
    assert!(
        freed_after <= Duration::from_secs(4),
        "freed after {freed_after:?} with a 2 s lease TTL"
    );
    drop(holding);
    let _ = std::fs::remove_dir_all(&spool);
}

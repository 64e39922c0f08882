//! Operations of the built aggregator binary: stream retention never drops what a group still
//! needs, and SIGHUP reloads the price file for new events.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use serde_json::Value;
use shared::UsageEvent;
use tests::harness::{StreamEntry, eventually, free_port, redis_url, unique_stream};
use tests::process::Process;

fn event(i: usize, model: &str) -> UsageEvent {
    UsageEvent {
        v: 1,
        id: format!("ops-{model}-{i}"),
        ts: chrono::Utc::now().timestamp_millis(),
        key_id: Some("key_ops".into()),
        account_id: None,
        provider: "anthropic".into(),
        endpoint: "messages".into(),
        model: model.into(),
        status: 200,
        stream: false,
        latency_us: 1000,
        ttft_us: None,
        input_tokens: 1000,
        output_tokens: 0,
        cache_creation_input_tokens: 0,
        cache_creation_1h_input_tokens: 0,
        cache_read_input_tokens: 0,
        service_tier: None,
        error: None,
    }
}

async fn add(conn: &mut redis::aio::MultiplexedConnection, stream: &str, events: &[UsageEvent]) {
    tests::harness::xadd_events(conn, stream, events).await;
}

async fn usage_row(http: &reqwest::Client, port: u16) -> Option<Value> {
    let usage: Value = http
        .get(format!("http://127.0.0.1:{port}/v1/usage"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(usage["rows"][0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_what_any_group_has_not_acknowledged() {
    let stream = unique_stream();
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let events: Vec<UsageEvent> = (0..50).map(|i| event(i, "claude-haiku-4-5")).collect();
    add(&mut conn, &stream, &events).await;
    // Another group has acknowledged the first 10 entries and holds the next 5 unacknowledged.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("laggard")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let read = |count: usize| {
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("laggard")
            .arg("c")
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .clone()
    };
    let first: Vec<(String, Vec<StreamEntry>)> = read(10).query_async(&mut conn).await.unwrap();
    let ids: Vec<String> = first[0].1.iter().map(|(id, _)| id.clone()).collect();
    let _: u64 = redis::cmd("XACK")
        .arg(&stream)
        .arg("laggard")
        .arg(&ids)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = read(5).query_async(&mut conn).await.unwrap();

    let port = free_port();
    let _aggregator = Process::spawn(
        "aggregator",
        "aggregator",
        &[
            ("REDIS_URL", redis_url().to_owned()),
            ("METER_STREAM", stream.clone()),
            ("AGGREGATOR_LISTEN", format!("127.0.0.1:{port}")),
            ("METER_STREAM_RETENTION_SECS", "0".to_owned()),
            ("METER_TRIM_INTERVAL_SECS", "1".to_owned()),
        ],
    );
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), || async {
        (usage_row(&http, port).await?["requests"].as_u64()? == 50).then_some(())
    })
    .await;
    let xlen = || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            redis::cmd("XLEN")
                .arg(&stream)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
        }
    };
    eventually(Duration::from_secs(10), || async {
        (xlen().await == 40).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        xlen().await,
        40,
        "the laggard's pending entries survive later trims"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_prices_for_new_events() {
    let stream = unique_stream();
    let dir = std::env::temp_dir().join(format!("meter-prices-{stream}"));
    std::fs::create_dir_all(&dir).unwrap();
    let prices = dir.join("prices.json");
    std::fs::write(
        &prices,
        r#"{"ops-model": {"input_cost_per_token": 1e-06, "output_cost_per_token": 0}}"#,
    )
    .unwrap();
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let port = free_port();
    let aggregator = Process::spawn(
        "aggregator",
        "aggregator",
        &[
            ("REDIS_URL", redis_url().to_owned()),
            ("METER_STREAM", stream.clone()),
            ("AGGREGATOR_LISTEN", format!("127.0.0.1:{port}")),
            ("PRICING_FILE", prices.display().to_string()),
        ],
    );
    let http = reqwest::Client::new();
    add(
        &mut conn,
        &stream,
        &(0..10).map(|i| event(i, "ops-model")).collect::<Vec<_>>(),
    )
    .await;
    eventually(Duration::from_secs(30), || async {
        (usage_row(&http, port).await?["requests"].as_u64()? == 10).then_some(())
    })
    .await;

    std::fs::write(
        &prices,
        r#"{"ops-model": {"input_cost_per_token": 2e-06, "output_cost_per_token": 0}}"#,
    )
    .unwrap();
    let hup = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(aggregator.pid().to_string())
        .status()
        .unwrap();
    assert!(hup.success());
    // The reload is asynchronous; give the signal a moment before the new events arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    add(
        &mut conn,
        &stream,
        &(10..20).map(|i| event(i, "ops-model")).collect::<Vec<_>>(),
    )
    .await;
    let row = eventually(Duration::from_secs(30), || async {
        let row = usage_row(&http, port).await?;
        (row["requests"].as_u64()? == 20).then_some(row)
    })
    .await;
    // 10 × 1000 × $1e-6 before, 10 × 1000 × $2e-6 after.
    assert_eq!(row["cost_usd"], "0.03");
    assert!(aggregator.terminate().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_token_counts_are_dead_lettered() {
    let stream = unique_stream();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut fine = event(1, "claude-sonnet-4-5");
    fine.ts = now;
    // Twice u64::MAX output tokens would overflow a counter half-way through a commit.
    let mut huge = event(2, "claude-sonnet-4-5");
    huge.ts = now;
    huge.output_tokens = u64::MAX;
    let mut huge2 = huge.clone();
    huge2.id = "huge-2".into();
    tests::harness::xadd_events(&mut conn, &stream, &[fine, huge, huge2]).await;
    let (aggregator, _stop) = tests::harness::spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let dead = format!("{stream}:dead");
    eventually(Duration::from_secs(20), || {
        let mut conn = conn.clone();
        let dead = dead.clone();
        async move {
            let n: usize = redis::cmd("XLEN")
                .arg(&dead)
                .query_async(&mut conn)
                .await
                .ok()?;
            (n == 2).then_some(())
        }
    })
    .await;
    let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
        .arg(&dead)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reason = entries[0]
        .1
        .iter()
        .find(|(f, _)| f == "reason")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap();
    assert!(reason.contains("implausible output_tokens"), "{reason}");
    let from = now - 3_600_000;
    let to = now + 3_600_000;
    // Dead letters are written before the batch's commit: wait for the commit too.
    eventually(Duration::from_secs(20), || async {
        let body: Value = http
            .get(format!("http://{aggregator}/v1/usage?from={from}&to={to}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (body["rows"][0]["requests"] == 1).then_some(())
    })
    .await;
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("aggregator")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(parts) = summary else {
        panic!("XPENDING summary")
    };
    assert_eq!(parts[0], redis::Value::Int(0), "nothing left pending");
}

/// Another writer (a second consumer, a replay's switch) changes cells this aggregator has in
/// its cache: its next commit is refused, re-merged on the current values, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_changed_behind_the_cache_is_merged_not_overwritten() {
    let stream = unique_stream();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (addr, _stop) = tests::harness::spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let metric = |name: &'static str| {
        let http = http.clone();
        async move {
            let text = http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        }
    };
    let first: Vec<UsageEvent> = (0..10).map(|i| event(i, "claude-sonnet-4-5")).collect();
    add(&mut conn, &stream, &first).await;
    eventually(Duration::from_secs(20), || async {
        (metric("meter_events_applied_total ").await? == 10.0).then_some(())
    })
    .await;

    // Five more requests in every cell of the tuple, written the way a commit writes them.
    let keyspace = shared::Keyspace::new(&stream).unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(keyspace.key("st:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 4, "minute, hour, day and month: {keys:?}");
    for key in &keys {
        let cells: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        for (tuple, value) in cells {
            let mut cell = aggregator::cell::Cell::decode(&value).unwrap();
            cell.totals.requests += 5;
            redis::cmd("HSET")
                .arg(key)
                .arg(tuple)
                .arg(cell.encode(aggregator::cell::new_stamp()))
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
    }

    let second: Vec<UsageEvent> = (10..20).map(|i| event(i, "claude-sonnet-4-5")).collect();
    add(&mut conn, &stream, &second).await;
    eventually(Duration::from_secs(20), || async {
        (metric("meter_events_applied_total ").await? == 20.0).then_some(())
    })
    .await;
    assert_eq!(
        usage_row(&http, addr.port()).await.unwrap()["requests"],
        25,
        "10 + 5 written by another + 10"
    );
    let conflicts = metric("meter_commit_conflicts_total ").await.unwrap();
    assert!(conflicts >= 1.0, "the stale cache was refused: {conflicts}");
}

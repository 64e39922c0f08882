//! At-least-once delivery, exactly-once effect (ARCHITECTURE.md's invariants): SIGKILLing the aggregator
//! ten times at random moments while events keep arriving, restarting it, and running two
//! aggregators in one group change no figure, whether a batch is one commit script or dozens.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::Value;
use shared::UsageEvent;
use tests::fixtures::{Lcg, hand_cost, list_price};
use tests::harness::{eventually, free_port, metric, redis_url, unique_stream};
use tests::process::Process;

fn events(n: usize, seed: u64) -> Vec<UsageEvent> {
    let mut rng = Lcg(seed);
    let models = ["claude-sonnet-4-5", "claude-haiku-4-5", "mystery-model-1"];
    let now = chrono::Utc::now().timestamp_millis();
    (0..n)
        .map(|i| {
            let cache_creation = rng.next(500);
            UsageEvent {
                v: 1,
                id: format!("ev-{seed}-{i}"),
                // Spread over the last five hours: several hour buckets.
                ts: now - rng.next(5 * 3_600_000) as i64,
                key_id: Some(format!("key_{}", rng.next(4))),
                account_id: Some("acct_1".into()),
                provider: "anthropic".into(),
                endpoint: "messages".into(),
                model: models[rng.next(3) as usize].into(),
                status: [200, 200, 200, 429, 500][rng.next(5) as usize],
                stream: rng.next(2) == 1,
                latency_us: rng.next(2_000_000),
                ttft_us: None,
                input_tokens: rng.next(5000),
                output_tokens: rng.next(2000),
                cache_creation_input_tokens: cache_creation,
                cache_creation_1h_input_tokens: rng.next(cache_creation + 1),
                cache_read_input_tokens: rng.next(20000),
                service_tier: None,
                error: None,
            }
        })
        .collect()
}

async fn xadd_all(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    payloads: &[Vec<u8>],
) {
    for chunk in payloads.chunks(500) {
        let mut pipe = redis::pipe();
        for p in chunk {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("e")
                .arg(p)
                .ignore();
        }
        pipe.query_async::<()>(conn).await.unwrap();
    }
}

/// How an aggregator cuts its work: entries per batch, events per commit script.
#[derive(Clone, Copy)]
struct Sizes {
    batch: usize,
    commit: usize,
}

fn spawn_aggregator(stream: &str, port: u16, sizes: Sizes) -> Process {
    spawn_aggregator_with(stream, port, sizes, &[])
}

fn spawn_aggregator_with(
    stream: &str,
    port: u16,
    sizes: Sizes,
    extra: &[(&str, String)],
) -> Process {
    let mut env = vec![
        ("REDIS_URL", redis_url().to_owned()),
        ("METER_STREAM", stream.to_owned()),
        ("AGGREGATOR_LISTEN", format!("127.0.0.1:{port}")),
        ("METER_BATCH_SIZE", sizes.batch.to_string()),
        ("METER_COMMIT_EVENTS", sizes.commit.to_string()),
        // Entries a killed consumer held are taken over quickly.
        ("METER_CLAIM_IDLE_MS", "300".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    Process::spawn("aggregator", "aggregator", &env)
}

/// Entries of `stream` delivered to the aggregators' group and not acknowledged.
async fn pending(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Option<u64> {
    let summary: (u64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
        .arg(stream)
        .arg("aggregator")
        .query_async(conn)
        .await
        .ok()?;
    Some(summary.0)
}

async fn usage(http: &reqwest::Client, port: u16) -> Option<Value> {
    let url = format!("http://127.0.0.1:{port}/v1/usage?group_by=model");
    http.get(url).send().await.ok()?.json().await.ok()
}

/// Every figure of `body` (a usage query grouped by model) equals the sum over `all`.
fn assert_exact_by_model(body: &Value, all: &[UsageEvent]) {
    let rows = body["rows"].as_array().unwrap();
    for model in ["claude-sonnet-4-5", "claude-haiku-4-5", "mystery-model-1"] {
        let of_model: Vec<&UsageEvent> = all.iter().filter(|e| e.model == model).collect();
        let row = rows.iter().find(|r| r["model"] == model).unwrap();
        let sum = |f: fn(&UsageEvent) -> u64| of_model.iter().map(|e| f(e) as i64).sum::<i64>();
        assert_eq!(row["requests"], of_model.len() as i64, "{model}");
        assert_eq!(
            row["errors"],
            of_model.iter().filter(|e| e.status >= 400).count() as i64
        );
        assert_eq!(row["input_tokens"], sum(|e| e.input_tokens));
        assert_eq!(row["output_tokens"], sum(|e| e.output_tokens));
        assert_eq!(
            row["cache_creation_input_tokens"],
            sum(|e| e.cache_creation_input_tokens)
        );
        assert_eq!(
            row["cache_read_input_tokens"],
            sum(|e| e.cache_read_input_tokens)
        );
        let want_cost: Decimal = of_model.iter().map(|e| hand_cost(e)).sum();
        assert_eq!(
            Decimal::from_str(row["cost_usd"].as_str().unwrap()).unwrap(),
            want_cost,
            "{model}"
        );
        let unpriced = if list_price(model).is_some() {
            0
        } else {
            of_model.len() as i64
        };
        assert_eq!(row["unpriced_requests"], unpriced);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restarts_duplicates_and_two_consumers_change_no_figure() {
    kills_restarts_and_two_consumers_change_no_figure(Sizes {
        batch: 100,
        commit: 500,
    })
    .await;
}

/// Batches of 2,000 over four keys, each committed as dozens of scripts of at most 7 events:
/// every key is cut into many scripts that write the same cells, and the kills land between
/// the scripts of a batch, some applied and acknowledged, the rest pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_committed_as_many_scripts_survives_kills_between_them() {
    kills_restarts_and_two_consumers_change_no_figure(Sizes {
        batch: 2000,
        commit: 7,
    })
    .await;
}

async fn kills_restarts_and_two_consumers_change_no_figure(sizes: Sizes) {
    let stream = unique_stream();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    let all = events(6000, 7);
    let mut payloads: Vec<Vec<u8>> = all.iter().map(shared::encode).collect();
    // Producer retries: 300 events are sent again (same id), and two entries are garbage.
    payloads.extend(all.iter().step_by(20).map(shared::encode));
    payloads.push(b"not messagepack".to_vec());
    payloads.push(shared::encode(&UsageEvent {
        v: 99,
        ..all[0].clone()
    }));
    let http = reqwest::Client::new();
    let mut rng = Lcg(42);
    let (port_a, port_b) = (free_port(), free_port());
    // Ten SIGKILLs at random moments under load: each round's share of the events arrives
    // while that round's aggregator is starting and consuming.
    let rounds = 10;
    let per_round = payloads.len().div_ceil(rounds);
    for slice in payloads.chunks(per_round) {
        let aggregator = spawn_aggregator(&stream, port_a, sizes);
        xadd_all(&mut conn, &stream, slice).await;
        tokio::time::sleep(Duration::from_millis(150 + rng.next(400))).await;
        aggregator.kill();
    }
    // Two consumers in one group finish the job.
    let a = spawn_aggregator(&stream, port_a, sizes);
    let b = spawn_aggregator(&stream, port_b, sizes);

    let want_requests = all.len() as i64;
    let body = eventually(Duration::from_secs(60), || async {
        let body = usage(&http, port_b).await?;
        let total: i64 = body["rows"]
            .as_array()?
            .iter()
            .filter_map(|r| r["requests"].as_i64())
            .sum();
        (total >= want_requests).then_some(body)
    })
    .await;
    // Let any straggling batch land before comparing exactly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = usage(&http, port_a).await.unwrap_or(body);

    assert_exact_by_model(&body, &all);

    // Nothing is left pending, and both garbage entries were dead-lettered. The garbage sits at
    // the end of the stream, so it may be in a batch committed after the counts above.
    eventually(Duration::from_secs(20), || async {
        let mut conn = conn.clone();
        let dead: usize = redis::cmd("XLEN")
            .arg(format!("{stream}:dead"))
            .query_async(&mut conn)
            .await
            .ok()?;
        (dead >= 2 && pending(&mut conn, &stream).await? == 0).then_some(())
    })
    .await;
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// A backlog of one read is committed in scripts of at most `--commit-events` events, the events
/// of one key together, and a key with more events than that is cut into scripts that share its
/// cells: every figure stays exact, and no script applied more than the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_committed_in_scripts_of_at_most_commit_events() {
    let stream = unique_stream();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut all = events(1500, 11);
    // One key of 1,000 events, one of 300 and one of 200, interleaved.
    for (i, event) in all.iter_mut().enumerate() {
        event.key_id = Some(match i % 15 {
            0..10 => "key_big".into(),
            10..13 => "key_mid".into(),
            _ => "key_small".into(),
        });
    }
    let payloads: Vec<Vec<u8>> = all.iter().map(shared::encode).collect();
    xadd_all(&mut conn, &stream, &payloads).await;

    let port = free_port();
    let aggregator = spawn_aggregator(
        &stream,
        port,
        Sizes {
            batch: 2000,
            commit: 7,
        },
    );
    let http = reqwest::Client::new();
    let addr = format!("127.0.0.1:{port}");
    let applied = eventually(Duration::from_secs(60), || async {
        let applied: u64 = metric(&http, &addr, "meter_events_applied_total").await?;
        (applied >= 1500).then_some(applied)
    })
    .await;
    assert_eq!(applied, 1500);
    let scripts: u64 = metric(&http, &addr, "meter_batches_total").await.unwrap();
    // Cut by key, 1000 + 300 + 200 events make at least 143 + 43 + 29 scripts.
    assert!(scripts >= 215, "{scripts} scripts for 1,500 events");

    let url = format!("http://{addr}/v1/usage?group_by=key");
    let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{body}");
    for row in rows {
        let key = row["key"].as_str().unwrap();
        let of_key: Vec<&UsageEvent> = all
            .iter()
            .filter(|e| e.key_id.as_deref() == Some(key))
            .collect();
        assert_eq!(row["requests"], of_key.len() as i64, "{key}");
        assert_eq!(
            row["input_tokens"],
            of_key.iter().map(|e| e.input_tokens as i64).sum::<i64>(),
            "{key}"
        );
        let want_cost: Decimal = of_key.iter().map(|e| hand_cost(e)).sum();
        assert_eq!(
            Decimal::from_str(row["cost_usd"].as_str().unwrap()).unwrap(),
            want_cost,
            "{key}"
        );
    }
    assert!(aggregator.terminate().success());
}

/// A batch cut into many scripts is acknowledged once all of them applied, so a consumer killed
/// in between leaves applied entries pending. Here it is killed just then, three times, and
/// restarted only after its seen-sets (one-second dedupe window: kept three seconds) are gone,
/// so nothing but the record of applied entries stops them from being counted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_applied_but_not_acknowledged_are_not_counted_again_after_the_seen_sets_expired() {
    let stream = unique_stream();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let all = events(8_000, 13);
    let payloads: Vec<Vec<u8>> = all.iter().map(shared::encode).collect();
    xadd_all(&mut conn, &stream, &payloads).await;

    let record = format!("{{{stream}}}:applied");
    let sizes = Sizes {
        batch: 2000,
        commit: 7,
    };
    let window = [("METER_DEDUPE_WINDOW_SECS", "1".to_owned())];
    let port = free_port();
    let fields = |mut conn: redis::aio::MultiplexedConnection| {
        let record = record.clone();
        async move {
            let fields: HashSet<String> = redis::cmd("HKEYS")
                .arg(&record)
                .query_async(&mut conn)
                .await
                .unwrap();
            fields
        }
    };
    let mut caught = 0;
    // What earlier lives left in the record, which a new life settles first.
    let mut left = HashSet::new();
    for _ in 0..20 {
        if caught == 3 {
            break;
        }
        let aggregator = spawn_aggregator_with(&stream, port, sizes, &window);
        // Killed as soon as this life has commits applied and not yet acknowledged.
        let mut recorded = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if !fields(conn.clone()).await.is_subset(&left) {
                recorded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        aggregator.kill();
        if !recorded {
            break;
        }
        let now = fields(conn.clone()).await;
        if now.is_subset(&left) {
            // The batch was acknowledged between the look and the kill: try again.
            continue;
        }
        left = now;
        caught += 1;
        // Until every seen-set has expired.
        eventually(Duration::from_secs(20), || async {
            let mut conn = conn.clone();
            let (_, seen): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(0)
                .arg("MATCH")
                .arg(format!("{{{stream}}}:seen:*"))
                .arg("COUNT")
                .arg(100_000)
                .query_async(&mut conn)
                .await
                .ok()?;
            seen.is_empty().then_some(())
        })
        .await;
    }
    assert_eq!(
        caught, 3,
        "never killed with applied entries unacknowledged"
    );

    let aggregator = spawn_aggregator_with(&stream, port, sizes, &window);
    let http = reqwest::Client::new();
    let want_requests = all.len() as i64;
    eventually(Duration::from_secs(60), || async {
        let mut conn = conn.clone();
        let pending = pending(&mut conn, &stream).await?;
        let read: u64 = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async::<Vec<std::collections::HashMap<String, redis::Value>>>(&mut conn)
            .await
            .ok()?
            .first()
            .and_then(|g| match g.get("entries-read") {
                Some(redis::Value::Int(n)) => Some(*n as u64),
                _ => None,
            })?;
        (pending == 0 && read >= want_requests as u64).then_some(())
    })
    .await;
    let body = usage(&http, port).await.unwrap();
    assert_exact_by_model(&body, &all);
    let fields: u64 = redis::cmd("HLEN")
        .arg(&record)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fields, 0, "the record is left empty");
    assert!(aggregator.terminate().success());
}

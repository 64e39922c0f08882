//! At-least-once delivery, exactly-once effect (ARCHITECTURE.md's invariants): SIGKILLing the aggregator
//! ten times at random moments while events keep arriving, restarting it, and running two
//! aggregators in one group change no figure.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::Value;
use shared::UsageEvent;
use tests::fixtures::{Lcg, hand_cost, list_price};
use tests::harness::{eventually, free_port, redis_url, unique_stream};
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

fn spawn_aggregator(stream: &str, port: u16) -> Process {
    Process::spawn(
        "aggregator",
        "aggregator",
        &[
            ("REDIS_URL", redis_url().to_owned()),
            ("METER_STREAM", stream.to_owned()),
            ("AGGREGATOR_LISTEN", format!("127.0.0.1:{port}")),
            ("METER_BATCH_SIZE", "100".to_owned()),
            // Entries a killed consumer held are taken over quickly.
            ("METER_CLAIM_IDLE_MS", "300".to_owned()),
        ],
    )
}

async fn usage(http: &reqwest::Client, port: u16) -> Option<Value> {
    let url = format!("http://127.0.0.1:{port}/v1/usage?group_by=model");
    http.get(url).send().await.ok()?.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restarts_duplicates_and_two_consumers_change_no_figure() {
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
        let aggregator = spawn_aggregator(&stream, port_a);
        xadd_all(&mut conn, &stream, slice).await;
        tokio::time::sleep(Duration::from_millis(150 + rng.next(400))).await;
        aggregator.kill();
    }
    // Two consumers in one group finish the job.
    let a = spawn_aggregator(&stream, port_a);
    let b = spawn_aggregator(&stream, port_b);

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

    // Nothing is left pending, and both garbage entries were dead-lettered. The garbage sits at
    // the end of the stream, so it may be in a batch committed after the counts above.
    eventually(Duration::from_secs(20), || async {
        let mut conn = conn.clone();
        let dead: usize = redis::cmd("XLEN")
            .arg(format!("{stream}:dead"))
            .query_async(&mut conn)
            .await
            .ok()?;
        let summary: (u64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("aggregator")
            .query_async(&mut conn)
            .await
            .ok()?;
        (dead >= 2 && summary.0 == 0).then_some(())
    })
    .await;
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

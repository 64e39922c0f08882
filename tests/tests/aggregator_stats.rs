//! The aggregator's figures against an independent computation in the test: random events
//! written straight to the stream, then every grouping, the hour buckets, late events and the
//! latency quantiles checked (docs/pricing.md, docs/stats-api.md, conservation).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::Value;
use shared::UsageEvent;
use tests::fixtures::{Lcg, hand_cost, list_price};
use tests::harness::{eventually, redis_url, spawn_aggregator, unique_stream};

const HOUR: i64 = 3_600_000;

fn events(now: i64) -> Vec<UsageEvent> {
    let mut rng = Lcg(2026);
    let models = ["claude-sonnet-4-5", "gpt-4o", "no-such-model"];
    (0..3000)
        .map(|i| {
            let model = models[rng.next(3) as usize];
            let cache_creation = if model == "gpt-4o" { 0 } else { rng.next(300) };
            // Mostly the last three hours; every 100th event is late by 2 or 10 days.
            let ts = match i % 100 {
                0 => now - 2 * 24 * HOUR - rng.next(HOUR as u64) as i64,
                50 => now - 10 * 24 * HOUR - rng.next(HOUR as u64) as i64,
                _ => now - rng.next(3 * HOUR as u64) as i64,
            };
            // Latencies spread over four decades, as LLM calls do.
            let latency_us = 10_000 + rng.next(10_000) * rng.next(10_000) / 10 + rng.next(1000);
            UsageEvent {
                v: 1,
                id: format!("stats-{i}"),
                ts,
                key_id: [Some("key_a"), Some("key_b"), None][rng.next(3) as usize]
                    .map(str::to_owned),
                account_id: Some(format!("acct_{}", rng.next(2))),
                provider: if model == "gpt-4o" {
                    "openai"
                } else {
                    "anthropic"
                }
                .into(),
                endpoint: if model == "gpt-4o" {
                    "chat_completions"
                } else {
                    "messages"
                }
                .into(),
                model: model.into(),
                status: [200, 200, 200, 200, 429, 500][rng.next(6) as usize],
                stream: rng.next(2) == 0,
                latency_us,
                ttft_us: Some(latency_us / (1 + rng.next(5))),
                input_tokens: rng.next(20_000),
                output_tokens: rng.next(4_000),
                cache_creation_input_tokens: cache_creation,
                cache_creation_1h_input_tokens: rng.next(cache_creation + 1),
                cache_read_input_tokens: rng.next(50_000),
                service_tier: None,
                error: None,
            }
        })
        .collect()
}

/// Nearest-rank quantile (rank = ceil(q n), at least 1).
fn exact_quantile(values: &mut [u64], q: f64) -> f64 {
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1] as f64
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

fn total(rows: &Value, field: &str) -> Decimal {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| match &r[field] {
            Value::String(s) => Decimal::from_str(s).unwrap(),
            v => Decimal::from(v.as_i64().unwrap()),
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grouping_bucket_and_quantile_matches_an_independent_computation() {
    let stream = unique_stream();
    let now = chrono::Utc::now().timestamp_millis();
    let all = events(now);
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    tests::harness::xadd_events(&mut conn, &stream, &all).await;

    let (addr, _stop) = spawn_aggregator(redis_url(), &stream).await;
    let http = reqwest::Client::new();
    let (from, to) = (now - 11 * 24 * HOUR, now + HOUR);
    let range = format!("from={from}&to={to}");
    eventually(Duration::from_secs(20), || async {
        let usage: Value = http
            .get(format!("http://{addr}/v1/usage?{range}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (usage["rows"][0]["requests"].as_u64()? == all.len() as u64).then_some(())
    })
    .await;

    // Ungrouped totals equal the independent sums.
    let usage = get(&http, format!("http://{addr}/v1/usage?{range}")).await;
    let rows = &usage["rows"];
    let sum = |f: fn(&UsageEvent) -> u64| Decimal::from(all.iter().map(f).sum::<u64>());
    assert_eq!(total(rows, "requests"), Decimal::from(all.len()));
    assert_eq!(
        total(rows, "errors"),
        Decimal::from(all.iter().filter(|e| e.status >= 400).count())
    );
    assert_eq!(total(rows, "input_tokens"), sum(|e| e.input_tokens));
    assert_eq!(total(rows, "output_tokens"), sum(|e| e.output_tokens));
    assert_eq!(
        total(rows, "cache_creation_input_tokens"),
        sum(|e| e.cache_creation_input_tokens)
    );
    assert_eq!(
        total(rows, "cache_read_input_tokens"),
        sum(|e| e.cache_read_input_tokens)
    );
    let want_cost: Decimal = all.iter().map(hand_cost).sum();
    assert!(
        (total(rows, "cost_usd") - want_cost).abs() <= Decimal::from_str("0.000000001").unwrap()
    );
    assert_eq!(
        total(rows, "unpriced_requests"),
        Decimal::from(
            all.iter()
                .filter(|e| list_price(&e.model).is_none())
                .count()
        )
    );

    // Conservation: every grouping sums to the same totals.
    for group_by in [
        "key",
        "model",
        "account",
        "provider",
        "endpoint",
        "status",
        "key,model",
        "model,status,account",
        "key,model,account,provider,endpoint,status",
    ] {
        let grouped = get(
            &http,
            format!("http://{addr}/v1/usage?{range}&group_by={group_by}"),
        )
        .await;
        for field in [
            "requests",
            "errors",
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cost_usd",
            "unpriced_requests",
        ] {
            assert_eq!(
                total(&grouped["rows"], field),
                total(rows, field),
                "{group_by} {field}"
            );
        }
    }
    // A filter selects exactly its events.
    let filtered = get(
        &http,
        format!("http://{addr}/v1/usage?{range}&model=gpt-4o&status=200"),
    )
    .await;
    let want = all
        .iter()
        .filter(|e| e.model == "gpt-4o" && e.status == 200)
        .count();
    assert_eq!(total(&filtered["rows"], "requests"), Decimal::from(want));

    // Hour buckets: late events land in the hour of their `ts`.
    let hourly = get(&http, format!("http://{addr}/v1/usage?{range}&bucket=hour")).await;
    let mut by_hour: BTreeMap<i64, usize> = BTreeMap::new();
    for e in &all {
        *by_hour.entry(e.ts.div_euclid(HOUR) * HOUR).or_default() += 1;
    }
    let got: BTreeMap<i64, usize> = hourly["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let start =
                chrono::DateTime::parse_from_rfc3339(r["bucket_start"].as_str().unwrap()).unwrap();
            (
                start.timestamp_millis(),
                r["requests"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(got, by_hour);

    // Spend counters (what cost and token limits read): lifetime exact, day sums complete.
    let keyspace = shared::Keyspace::new(&stream).unwrap();
    let of_key: Vec<&UsageEvent> = all
        .iter()
        .filter(|e| e.key_id.as_deref() == Some("key_a"))
        .collect();
    let lifetime: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(keyspace.key("sp:key_a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let tokens: u64 = of_key.iter().map(|e| e.total_tokens()).sum();
    assert_eq!(lifetime["t"], tokens as i64);
    // Counters that never moved from zero are not written.
    let counter = |name: &str| Decimal::from(lifetime.get(name).copied().unwrap_or(0));
    let exact = counter("ch") / Decimal::from(1_000_000_000u64)
        + counter("cl") / Decimal::from_str("1000000000000000000").unwrap();
    assert_eq!(exact, of_key.iter().map(|e| hand_cost(e)).sum::<Decimal>());
    let days: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(keyspace.key("sp:key_a:d"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let day_tokens: i64 = days
        .iter()
        .filter(|(f, _)| f.starts_with('t'))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(day_tokens, tokens as i64);

    // Latency and TTFT quantiles per model within 1% of the exact ones.
    let latency = get(
        &http,
        format!("http://{addr}/v1/latency?{range}&group_by=model&quantiles=0.5,0.9,0.99"),
    )
    .await;
    let rows = latency["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        let model = row["model"].as_str().unwrap();
        let of_model: Vec<&UsageEvent> = all.iter().filter(|e| e.model == model).collect();
        assert_eq!(row["count"].as_u64().unwrap() as usize, of_model.len());
        for (label, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
            let mut lat: Vec<u64> = of_model.iter().map(|e| e.latency_us).collect();
            let mut ttft: Vec<u64> = of_model.iter().filter_map(|e| e.ttft_us).collect();
            let want_lat = exact_quantile(&mut lat, q) / 1000.0;
            let want_ttft = exact_quantile(&mut ttft, q) / 1000.0;
            let got_lat = row["latency_ms"][label].as_f64().unwrap();
            let got_ttft = row["ttft_ms"][label].as_f64().unwrap();
            assert!(
                (got_lat - want_lat).abs() <= 0.01 * want_lat,
                "{model} {label}: {got_lat} vs {want_lat}"
            );
            assert!(
                (got_ttft - want_ttft).abs() <= 0.01 * want_ttft,
                "{model} {label}: {got_ttft} vs {want_ttft}"
            );
        }
    }
}

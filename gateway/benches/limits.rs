//! The local part of one limit decision: key names, script arguments (with the spend windows'
//! tiling into day/hour/minute fields), and reading the script's reply. It runs once per
//! attempt of every request of a limited key, next to one Redis round trip of ~50–100 µs on
//! loopback, so it should stay in single-digit microseconds.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use gateway::bench::{Attempt, Check, KeyRecord, Limit, SCRIPT, SpendCache, Spent, Verdict};
use redis::Script;
use shared::Keyspace;

fn key(limits: &[(&str, f64, u64)], budget: Option<f64>) -> KeyRecord {
    KeyRecord {
        id: "key_0192f1c2d3e4f5a6b7c8d9e0f1a2b3c4".into(),
        name: "bench".into(),
        limits: limits
            .iter()
            .map(|(metric, max, window_secs)| Limit {
                metric: (*metric).into(),
                max: *max,
                window_secs: *window_secs,
            })
            .collect(),
        budget_usd: budget,
        max_concurrency: Some(4),
        ..KeyRecord::default()
    }
}

fn decide(c: &mut Criterion) {
    let script = Script::new(SCRIPT);
    let keyspace = Keyspace::new("meter:events").expect("a valid stream name");
    // 13:17:05 on some day: every window has ragged minute ends.
    let now_ms = 1_767_000_000_000 + 13 * 3_600_000 + 17 * 60_000 + 5_000;
    let requests_only = key(&[("requests", 100.0, 60)], None);
    let every_limit = key(
        &[
            ("requests", 100.0, 60),
            ("tokens", 200_000.0, 3_600),
            ("cost_usd", 5.0, 86_400),
            ("cost_usd", 100.0, 30 * 86_400),
        ],
        Some(1_000.0),
    );
    let loadgen_key = key(
        &[
            ("requests", 100.0, 60),
            ("tokens", 200_000.0, 3_600),
            ("cost_usd", 5.0, 86_400),
        ],
        Some(1_000.0),
    );
    let month_only = key(&[("cost_usd", 100.0, 30 * 86_400)], None);
    let request_id = "0192f1c2-d3e4-7f5a-b7c8-d9e0f1a2b3c4";
    let admitted = [1, 3, 41, 59_000];

    let mut group = c.benchmark_group("limit decision");
    for (name, key, reply) in [
        (
            "requests window + concurrency",
            &requests_only,
            &admitted[..],
        ),
        (
            "requests, tokens 1 h, cost 1 d, budget, concurrency (loadgen's key)",
            &loadgen_key,
            &admitted[..],
        ),
        ("cost 30 d + concurrency", &month_only, &[1, 3][..]),
        (
            "requests, tokens 1 h, cost 1 d, cost 30 d, budget, concurrency",
            &every_limit,
            &admitted[..],
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let attempt = Attempt {
                    key,
                    request_id,
                    now_ms: black_box(now_ms),
                    lease_ttl_ms: 60_000,
                    wait_until_ms: 0,
                    read_spend: true,
                };
                let check = Check::new(&script, &keyspace, &attempt);
                let verdict = check.decide(black_box(reply));
                assert!(matches!(verdict, Ok(Verdict::Admitted { .. })));
                black_box(check);
            })
        });
    }
    // With fresh cached sums (`--spend-cache-ms`), the usual case: the cache lookup, then a
    // script call without the spend part.
    let cache = SpendCache::new(Duration::from_secs(3600));
    let read_at = Instant::now();
    cache.insert(
        &loadgen_key.id,
        read_at,
        Spent {
            windows: vec![('t', 3_600_000, 1_000), ('c', 86_400_000, 1_000)],
            lifetime_nanos: Some(1_000),
        },
    );
    group.bench_function("loadgen's key, spend sums cached", |b| {
        b.iter(|| {
            let read_spend = !cache.admits(black_box(&loadgen_key), read_at);
            let attempt = Attempt {
                key: &loadgen_key,
                request_id,
                now_ms: black_box(now_ms),
                lease_ttl_ms: 60_000,
                wait_until_ms: 0,
                read_spend,
            };
            let check = Check::new(&script, &keyspace, &attempt);
            let verdict = check.decide(black_box(&admitted));
            assert!(!read_spend && matches!(verdict, Ok(Verdict::Admitted { .. })));
            black_box(check.spent(&admitted));
        })
    });
    let attempt = Attempt {
        key: &every_limit,
        request_id,
        now_ms,
        lease_ttl_ms: 60_000,
        wait_until_ms: 0,
        read_spend: true,
    };
    let check = Check::new(&script, &keyspace, &attempt);
    group.bench_function("reading the reply only", |b| {
        b.iter(|| check.decide(black_box(&admitted)))
    });
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);

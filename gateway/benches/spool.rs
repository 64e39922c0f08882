//! What fsyncing the spool costs: events appended per second during a Redis outage, with and
//! without `sync`, for the batch sizes the publisher writes (one event when requests trickle in,
//! many under load; one fsync per batch either way). The spool lives in the system temp dir, so
//! the figures are that disk's.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::bench::{Spool, SpoolOptions};
use shared::UsageEvent;

fn event(n: u64) -> UsageEvent {
    UsageEvent {
        v: shared::SCHEMA_VERSION,
        id: format!("0190a0b0-0000-7000-8000-{n:012}"),
        ts: 1_767_225_600_000,
        key_id: Some("key_0192f1c2d3e4f5a6b7c8d9e0f1a2b3c4".into()),
        account_id: Some("acct_0192f1c2d3e4f5a6b7c8d9e0f1a2b3c4".into()),
        provider: "anthropic".into(),
        endpoint: "messages".into(),
        model: "claude-sonnet-4-5".into(),
        status: 200,
        stream: true,
        latency_us: 812_345,
        ttft_us: Some(123_456),
        input_tokens: 1_234,
        output_tokens: 567,
        cache_creation_input_tokens: 0,
        cache_creation_1h_input_tokens: 0,
        cache_read_input_tokens: 4_096,
        service_tier: None,
        error: None,
    }
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("spool_append");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for sync in [true, false] {
        for batch in [1_u64, 64, 512] {
            let dir: PathBuf = std::env::temp_dir().join(format!(
                "meter-spool-bench-{}-{sync}-{batch}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let options = SpoolOptions {
                sync,
                ..SpoolOptions::default()
            };
            let mut spool = Spool::open_with(&dir, options).expect("a spool in the temp dir");
            let events: Vec<UsageEvent> = (0..batch).map(event).collect();
            group.throughput(Throughput::Elements(batch));
            let name = if sync { "fsync" } else { "no_fsync" };
            group.bench_function(BenchmarkId::new(name, batch), |b| {
                b.iter(|| spool.append(black_box(&events)).expect("append"));
            });
            drop(spool);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);

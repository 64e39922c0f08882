//! `Pricing::price` runs once per consumed event, so it has a budget of well under 1 µs.
//! Loading runs once per process (or replay) and is measured only to keep startup honest.

use std::hint::black_box;

use aggregator::pricing::{Pricing, Usage};
use criterion::{Criterion, criterion_group, criterion_main};

fn price(c: &mut Criterion) {
    let pricing = Pricing::bundled();

    // A Claude Code turn: a little fresh input, a cache write, a large cache read. One lookup.
    let claude = Usage {
        model: "claude-sonnet-4-5-20250929",
        service_tier: None,
        input_tokens: 1_234,
        output_tokens: 567,
        cache_creation_input_tokens: 2_048,
        cache_creation_1h_input_tokens: 1_024,
        cache_read_input_tokens: 48_000,
    };
    // Long-context priority request: every base rate walks its tier and threshold candidates.
    let gpt = Usage {
        model: "gpt-5.6",
        service_tier: Some("priority"),
        input_tokens: 250_000,
        output_tokens: 4_000,
        cache_creation_input_tokens: 0,
        cache_creation_1h_input_tokens: 0,
        cache_read_input_tokens: 30_000,
    };
    // Worst-case lookup: exact, unprefixed and undated names are all tried.
    let fallback = Usage {
        model: "anthropic/claude-sonnet-4-6-20260217",
        ..claude
    };
    let unknown = Usage {
        model: "anthropic/not-a-model-20260217",
        ..claude
    };

    let mut group = c.benchmark_group("price");
    for (name, usage) in [
        ("claude_sonnet_4_5", claude),
        ("gpt_5_6_priority_above_272k", gpt),
        ("prefix_and_date_fallback", fallback),
        ("unknown_model", unknown),
    ] {
        group.bench_function(name, |b| b.iter(|| pricing.price(black_box(&usage))));
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let text = include_str!("../pricing/model_prices_and_context_window.json");
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    group.bench_function("bundled_snapshot", |b| {
        b.iter(|| Pricing::from_json(black_box(text)).map(|p| p.model_count()))
    });
    group.finish();
}

criterion_group!(benches, price, load);
criterion_main!(benches);

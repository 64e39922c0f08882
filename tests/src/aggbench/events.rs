//! The synthetic traffic: a deterministic generator of realistic usage events, and the totals
//! the aggregator must end up with once it has counted all of them.
//!
//! Events are generated one at a time and never kept, so a million of them cost no memory
//! here; what the check needs later is summed into [`Expected`] as they are made. Prices come
//! from the same bundled LiteLLM table the aggregator uses, so the expected cost is exact.

use std::collections::BTreeMap;

use aggregator::pricing::{Cost, Pricing, Usage};
use shared::UsageEvent;

use crate::rng::Rng;

/// One model of the traffic mix and the shape of its requests.
pub struct ModelSpec {
    pub name: &'static str,
    pub provider: &'static str,
    /// Endpoints this model is called through, picked uniformly.
    pub endpoints: &'static [&'static str],
    pub account: &'static str,
    /// Share of the traffic, in percent of the full catalog.
    pub weight: u32,
    input_median: f64,
    output_median: f64,
    /// Share of successful requests that read from the prompt cache.
    cache_read_share: f64,
}

const fn spec(
    name: &'static str,
    provider: &'static str,
    endpoints: &'static [&'static str],
    account: &'static str,
    weight: u32,
    (input_median, output_median, cache_read_share): (f64, f64, f64),
) -> ModelSpec {
    ModelSpec {
        name,
        provider,
        endpoints,
        account,
        weight,
        input_median,
        output_median,
        cache_read_share,
    }
}

const MESSAGES: &[&str] = &["messages"];
const CHAT: &[&str] = &["chat_completions"];
const RESPONSES: &[&str] = &["responses"];
const CHAT_OR_RESPONSES: &[&str] = &["chat_completions", "responses"];

/// The catalog, most-used first; every name but the last is priced in the bundled table.
/// (`claude-opus-4-1` is not: the snapshot has it only under Bedrock and Databricks names, so
/// the Opus slot uses `claude-opus-4-5`.) Gemini is called through Google's OpenAI-compatible
/// endpoint, which the gateway relays as an `openai` account. The last model is a fine-tune the
/// table cannot know, so those events are counted as unpriced.
pub const CATALOG: [ModelSpec; 10] = [
    spec(
        "claude-sonnet-4-5",
        "anthropic",
        MESSAGES,
        "acct_anthropic",
        25,
        (3000.0, 400.0, 0.6),
    ),
    spec(
        "gpt-4o-mini",
        "openai",
        CHAT,
        "acct_openai",
        15,
        (800.0, 200.0, 0.2),
    ),
    spec(
        "claude-haiku-4-5",
        "anthropic",
        MESSAGES,
        "acct_anthropic",
        15,
        (1500.0, 250.0, 0.4),
    ),
    spec(
        "gpt-5-mini",
        "openai",
        CHAT_OR_RESPONSES,
        "acct_openai",
        10,
        (1500.0, 600.0, 0.3),
    ),
    spec(
        "gpt-4o",
        "openai",
        CHAT,
        "acct_openai",
        8,
        (1200.0, 300.0, 0.3),
    ),
    spec(
        "gpt-5",
        "openai",
        CHAT_OR_RESPONSES,
        "acct_openai",
        8,
        (2500.0, 900.0, 0.4),
    ),
    spec(
        "gemini-2.5-pro",
        "openai",
        CHAT,
        "acct_gemini",
        7,
        (4000.0, 700.0, 0.2),
    ),
    spec(
        "claude-opus-4-5",
        "anthropic",
        MESSAGES,
        "acct_anthropic",
        5,
        (5000.0, 600.0, 0.6),
    ),
    spec(
        "o3",
        "openai",
        RESPONSES,
        "acct_openai",
        4,
        (2000.0, 1500.0, 0.3),
    ),
    spec(
        "ft:gpt-4o-mini-2024-07-18:acme::bench01",
        "openai",
        CHAT,
        "acct_openai",
        3,
        (600.0, 150.0, 0.0),
    ),
];

/// The first `n - 1` models of the catalog plus the unpriced one, so any mix of two or more
/// models still exercises the unpriced path.
pub fn pick_models(n: usize) -> anyhow::Result<Vec<&'static ModelSpec>> {
    let Some((unpriced, priced)) = CATALOG.split_last() else {
        anyhow::bail!("the model catalog is empty");
    };
    match n {
        0 => anyhow::bail!("--models must be at least 1"),
        1 => Ok(vec![&CATALOG[0]]),
        n if n <= CATALOG.len() => Ok(priced.iter().take(n - 1).chain([unpriced]).collect()),
        _ => anyhow::bail!("--models must be at most {}", CATALOG.len()),
    }
}

/// What the aggregator must report for one model.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ModelTotals {
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost: Cost,
    pub unpriced: u64,
}

impl ModelTotals {
    pub fn add(&mut self, other: &ModelTotals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost += other.cost;
        self.unpriced += other.unpriced;
    }
}

/// Everything generated so far, summed.
#[derive(Debug, Default)]
pub struct Expected {
    pub by_model: BTreeMap<&'static str, ModelTotals>,
    pub by_status: BTreeMap<u16, u64>,
    pub streams: u64,
    pub encoded_bytes: u64,
    pub min_ts: Option<i64>,
    pub max_ts: Option<i64>,
}

impl Expected {
    pub fn total(&self) -> ModelTotals {
        let mut total = ModelTotals::default();
        for t in self.by_model.values() {
            total.add(t);
        }
        total
    }
}

pub struct Generator {
    rng: Rng,
    models: Vec<&'static ModelSpec>,
    weight_total: u64,
    keys: u32,
    now_ms: i64,
    spread_ms: u64,
    /// `Some(n)`: `ts` follows the stream order over `n` events, as live traffic does.
    in_order: Option<u64>,
    pricing: Pricing,
    pub expected: Expected,
}

/// How far before its stream position an in-order event's `ts` may lie: `ts` is when the
/// request started, and it reaches the stream when the response ends.
const MAX_REQUEST_MS: u64 = 2_000;

impl Generator {
    /// Events stamped `now_ms` minus up to `spread_ms`, as live traffic reaching the stream.
    pub fn new(
        seed: u64,
        models: Vec<&'static ModelSpec>,
        keys: u32,
        now_ms: i64,
        spread_ms: u64,
    ) -> Self {
        let weight_total = models.iter().map(|m| u64::from(m.weight)).sum();
        Self {
            rng: Rng::new(seed),
            models,
            weight_total,
            keys: keys.max(1),
            now_ms,
            spread_ms,
            in_order: None,
            pricing: Pricing::bundled(),
            expected: Expected::default(),
        }
    }

    /// `ts` rises with the event number across the spread, each up to [`MAX_REQUEST_MS`] early,
    /// instead of being drawn uniformly: the order a stream of live traffic has.
    pub fn in_arrival_order(mut self, n: u64) -> Self {
        self.in_order = Some(n.max(1));
        self
    }

    /// Whether the bundled table prices `model` (at all; the amount depends on the usage).
    pub fn is_priced(&self, model: &str) -> bool {
        let probe = Usage {
            model,
            input_tokens: 1,
            ..Usage::default()
        };
        self.pricing.price(&probe).is_some()
    }

    /// The `i`-th event, encoded for the stream's `e` field, and its key, which decides its
    /// partition.
    pub fn encoded(&mut self, i: u64) -> (Vec<u8>, Option<String>) {
        let event = self.event(i);
        let bytes = shared::encode(&event);
        self.expected.encoded_bytes += bytes.len() as u64;
        (bytes, event.key_id)
    }

    fn pick_model(&mut self) -> &'static ModelSpec {
        let mut ticket = self.rng.below(self.weight_total);
        for model in &self.models {
            let weight = u64::from(model.weight);
            if ticket < weight {
                return model;
            }
            ticket -= weight;
        }
        // Unreachable while the weights sum to `weight_total`; the first model is a safe answer.
        self.models[0]
    }

    fn event(&mut self, i: u64) -> UsageEvent {
        let model = self.pick_model();
        let rng = &mut self.rng;
        // A few heavy keys and a long tail, as with real clients: squaring a uniform draw
        // skews it towards the low key numbers.
        let key = ((rng.unit() * rng.unit()) * f64::from(self.keys)) as u32;
        let endpoint = model.endpoints[rng.below(model.endpoints.len() as u64) as usize];
        let status = match rng.unit() {
            r if r < 0.965 => 200,
            r if r < 0.99 => 429,
            _ => 500,
        };
        let stream = rng.chance(0.6);
        let before_now = match self.in_order {
            Some(n) => {
                let position =
                    u128::from(self.spread_ms) * u128::from(n - 1 - i.min(n - 1)) / u128::from(n);
                u64::try_from(position).unwrap_or(u64::MAX) + rng.below(MAX_REQUEST_MS + 1)
            }
            None => rng.below(self.spread_ms + 1),
        };
        let ts = self.now_ms - i64::try_from(before_now).unwrap_or(0);
        let anthropic = model.provider == "anthropic";

        let mut event = UsageEvent {
            v: shared::SCHEMA_VERSION,
            id: format!("bench-{i:09}"),
            ts,
            key_id: Some(format!("key_{key:03}")),
            account_id: Some(model.account.to_owned()),
            provider: model.provider.to_owned(),
            endpoint: endpoint.to_owned(),
            model: model.name.to_owned(),
            status,
            stream,
            latency_us: 0,
            ttft_us: None,
            input_tokens: 0,
            output_tokens: 0,
            cache_creation_input_tokens: 0,
            cache_creation_1h_input_tokens: 0,
            cache_read_input_tokens: 0,
            service_tier: None,
            error: None,
        };
        if status == 200 {
            event.input_tokens = rng.count(model.input_median, 1.0, 1, 200_000);
            event.output_tokens = rng.count(model.output_median, 0.9, 1, 32_000);
            if rng.chance(model.cache_read_share) {
                event.cache_read_input_tokens =
                    rng.count(model.input_median * 4.0, 0.8, 1, 400_000);
            }
            // Only Anthropic reports cache writes, some of them with the 1-hour TTL (a part of
            // the cache-creation count, as the gateway records it).
            if anthropic && rng.chance(0.15) {
                let written = rng.count(model.input_median, 0.8, 1, 200_000);
                event.cache_creation_input_tokens = written;
                if rng.chance(0.3) {
                    event.cache_creation_1h_input_tokens = rng.below(written + 1);
                }
            }
            // Latency = time to first token + generation at a per-request speed, 50 ms – 60 s.
            let ttft = rng.count(700_000.0, 0.6, 50_000, 20_000_000);
            let per_token = rng.log_normal(12_000.0, 0.35);
            let generation = (event.output_tokens as f64 * per_token) as u64;
            event.latency_us = (ttft + generation).clamp(50_000, 60_000_000);
            event.ttft_us = stream.then_some(ttft.min(event.latency_us));
            event.service_tier = service_tier(rng, model).map(str::to_owned);
        } else {
            let median = if status == 429 {
                120_000.0
            } else {
                2_000_000.0
            };
            event.latency_us = rng.count(median, 0.8, 50_000, 60_000_000);
            let kind = if status == 429 {
                "rate_limit_error"
            } else {
                "api_error"
            };
            event.error = Some(kind.to_owned());
        }
        self.record(&event);
        event
    }

    fn record(&mut self, event: &UsageEvent) {
        let cost = self.pricing.price(&Usage {
            model: &event.model,
            service_tier: event.service_tier.as_deref(),
            input_tokens: event.input_tokens,
            output_tokens: event.output_tokens,
            cache_creation_input_tokens: event.cache_creation_input_tokens,
            cache_creation_1h_input_tokens: event.cache_creation_1h_input_tokens,
            cache_read_input_tokens: event.cache_read_input_tokens,
        });
        let expected = &mut self.expected;
        let model = self
            .models
            .iter()
            .find(|m| m.name == event.model)
            .map_or("?", |m| m.name);
        expected
            .by_model
            .entry(model)
            .or_default()
            .add(&ModelTotals {
                requests: 1,
                errors: u64::from(event.status >= 400),
                input_tokens: event.input_tokens,
                output_tokens: event.output_tokens,
                cost: cost.map_or(Cost::ZERO, |charge| charge.cost),
                unpriced: u64::from(cost.is_none()),
            });
        *expected.by_status.entry(event.status).or_default() += 1;
        expected.streams += u64::from(event.stream);
        expected.min_ts = Some(expected.min_ts.map_or(event.ts, |t| t.min(event.ts)));
        expected.max_ts = Some(expected.max_ts.map_or(event.ts, |t| t.max(event.ts)));
    }
}

/// What the provider reports: Anthropic says `standard`; OpenAI says `default` unless the
/// client asked for flex processing (reasoning models) or priority (gpt-4o), which change the
/// price; Google's compatible endpoint reports none.
fn service_tier(rng: &mut Rng, model: &ModelSpec) -> Option<&'static str> {
    let tier = match (model.provider, model.name) {
        ("anthropic", _) => "standard",
        (_, "gemini-2.5-pro") => return None,
        (_, "gpt-5" | "gpt-5-mini" | "o3") if rng.chance(0.1) => "flex",
        (_, "gpt-4o") if rng.chance(0.05) => "priority",
        _ => "default",
    };
    Some(tier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_events() {
        let make = || {
            let mut g =
                Generator::new(7, pick_models(10).unwrap(), 100, 1_767_225_600_000, 600_000);
            (0..50).map(|i| g.encoded(i)).collect::<Vec<_>>()
        };
        assert_eq!(make(), make());
    }

    #[test]
    fn every_catalog_model_but_the_fine_tune_is_priced() {
        let g = Generator::new(1, pick_models(10).unwrap(), 1, 0, 0);
        let unpriced: Vec<&str> = CATALOG
            .iter()
            .map(|m| m.name)
            .filter(|m| !g.is_priced(m))
            .collect();
        assert_eq!(unpriced, [CATALOG[9].name]);
    }
}

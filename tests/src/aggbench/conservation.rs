//! The check that the aggregator counted every event exactly once, with exact tokens and cost:
//! its `/v1/usage` grouped by model against the sums made while generating.

use std::collections::BTreeMap;
use std::time::Duration;

use aggregator::pricing::Cost;
use anyhow::Context;
use serde_json::Value;

use crate::events::{Expected, ModelTotals};
use crate::probes::AggregatorMetrics;

const HOUR_MS: i64 = 3_600_000;

/// One line of the check.
pub struct Check {
    pub what: String,
    pub expected: String,
    pub actual: String,
}

impl Check {
    fn new(what: impl Into<String>, expected: impl ToString, actual: impl ToString) -> Self {
        Self {
            what: what.into(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }

    pub fn ok(&self) -> bool {
        self.expected == self.actual
    }
}

/// Reads the aggregator's totals and compares them, overall and per model.
pub async fn check(
    http: &reqwest::Client,
    base_url: &str,
    expected: &Expected,
    n: u64,
    metrics: &AggregatorMetrics,
) -> anyhow::Result<Vec<Check>> {
    let (Some(min_ts), Some(max_ts)) = (expected.min_ts, expected.max_ts) else {
        anyhow::bail!("no events were generated");
    };
    let url = format!(
        "{base_url}/v1/usage?from={}&to={}&group_by=model",
        min_ts - HOUR_MS,
        max_ts + HOUR_MS
    );
    let body: Value = http
        .get(&url)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?
        .json()
        .await
        .context("the usage response is not JSON")?;
    let actual = rows_by_model(&body)?;

    let want = expected.total();
    let mut got = ModelTotals::default();
    for totals in actual.values() {
        got.add(totals);
    }
    let mut checks = vec![
        Check::new("total requests (= events generated)", n, got.requests),
        Check::new(
            "total requests (= sum over models)",
            want.requests,
            got.requests,
        ),
        Check::new("total error requests (429 + 500)", want.errors, got.errors),
        Check::new("total input tokens", want.input_tokens, got.input_tokens),
        Check::new("total output tokens", want.output_tokens, got.output_tokens),
        Check::new("total cost, USD (bundled prices)", want.cost, got.cost),
        Check::new("unpriced requests", want.unpriced, got.unpriced),
    ];
    checks.push(Check::new(
        "rows (models) in the result",
        expected.by_model.len(),
        actual.len(),
    ));
    for model in actual.keys() {
        if !expected.by_model.contains_key(model.as_str()) {
            checks.push(Check::new(format!("model {model}"), "absent", "present"));
        }
    }
    for (model, want) in &expected.by_model {
        let got = actual.get(*model).copied().unwrap_or_default();
        if got != *want {
            checks.push(Check::new(
                format!("model {model}: requests / input / output / cost"),
                summary(want),
                summary(&got),
            ));
        }
    }
    checks.extend([
        Check::new("`meter_events_applied_total`", n, metrics.applied),
        Check::new(
            "`meter_events_unpriced_total`",
            want.unpriced,
            metrics.unpriced,
        ),
        Check::new("`meter_events_duplicate_total`", 0, metrics.duplicates),
        Check::new(
            "`meter_events_dead_lettered_total`",
            0,
            metrics.dead_lettered,
        ),
        Check::new(
            "`meter_consumer_lag` / `meter_consumer_pending`",
            "0 / 0",
            format!("{} / {}", gauge(metrics.lag), gauge(metrics.pending)),
        ),
    ]);
    Ok(checks)
}

fn summary(t: &ModelTotals) -> String {
    format!(
        "{} / {} / {} / {}",
        t.requests, t.input_tokens, t.output_tokens, t.cost
    )
}

fn gauge(value: Option<u64>) -> String {
    value.map_or_else(|| "absent".into(), |v| v.to_string())
}

/// The rows of a `group_by=model` response, keyed by model.
fn rows_by_model(body: &Value) -> anyhow::Result<BTreeMap<String, ModelTotals>> {
    let rows = body["rows"]
        .as_array()
        .context("the usage response has no `rows` array")?;
    let mut out = BTreeMap::new();
    for row in rows {
        let model = row["model"].as_str().context("a row without `model`")?;
        let number = |name: &str| {
            row[name]
                .as_u64()
                .with_context(|| format!("row {model}: `{name}` is not a count"))
        };
        let cost_text = row["cost_usd"]
            .as_str()
            .with_context(|| format!("row {model}: `cost_usd` is not a string"))?;
        let cost: Cost = cost_text
            .parse()
            .with_context(|| format!("row {model}: cost {cost_text:?}"))?;
        let totals = ModelTotals {
            requests: number("requests")?,
            errors: number("errors")?,
            input_tokens: number("input_tokens")?,
            output_tokens: number("output_tokens")?,
            cost,
            unpriced: number("unpriced_requests")?,
        };
        out.entry(model.to_owned())
            .or_insert_with(ModelTotals::default)
            .add(&totals);
    }
    Ok(out)
}

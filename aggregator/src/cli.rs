//! The command line: `aggregator` alone runs the server (docs/configuration.md); subcommands are
//! one-shot tools over the same configuration.
//!
//! `aggregator usage` reads Redis directly rather than calling the HTTP API: it needs no running
//! server and no admin token, takes the same `--redis-url`/`--stream` settings as the server,
//! and runs the very code that answers `/v1/usage` (parsing, planning, reading, grouping), so
//! its figures and errors are the API's by construction; `--json` prints the API's document.

use std::collections::HashMap;

use clap::{Args as ClapArgs, Parser, Subcommand};
use serde_json::Value;

use crate::config::{Args, Config};
use crate::query::Kind;

#[derive(Debug, Parser)]
#[command(
    name = "aggregator",
    version,
    about = "Consumes usage events, prices them, serves stats"
)]
pub struct Cli {
    #[command(flatten)]
    pub args: Args,
    /// Without a subcommand, the aggregator runs as the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prints usage and cost from the stats in Redis, as a table or as `/v1/usage` JSON.
    Usage(UsageArgs),
    /// Recomputes stats and spend counters of whole days from the retained stream (e.g. with new
    /// prices) while live aggregators keep consuming, then switches to them atomically.
    Replay(crate::replay::ReplayArgs),
}

#[derive(Debug, ClapArgs)]
pub struct UsageArgs {
    /// Start, RFC 3339 or Unix ms (default: 7 days before `--to`).
    #[arg(long)]
    pub from: Option<String>,
    /// End (exclusive), RFC 3339 or Unix ms (default: the end of the current minute).
    #[arg(long)]
    pub to: Option<String>,
    /// minute, hour, day, month or all.
    #[arg(long)]
    pub bucket: Option<String>,
    /// Comma list of key, model, account, provider, endpoint, status.
    #[arg(long)]
    pub group_by: Option<String>,
    /// Fixed offset for day and month buckets, such as +08:00.
    #[arg(long, allow_hyphen_values = true)]
    pub tz: Option<String>,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub provider: Option<String>,
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long)]
    pub status: Option<String>,
    /// Print the `/v1/usage` JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl UsageArgs {
    /// The same query parameters the HTTP API takes.
    fn params(&self) -> HashMap<String, String> {
        [
            ("from", &self.from),
            ("to", &self.to),
            ("bucket", &self.bucket),
            ("group_by", &self.group_by),
            ("tz", &self.tz),
            ("key", &self.key),
            ("model", &self.model),
            ("account", &self.account),
            ("provider", &self.provider),
            ("endpoint", &self.endpoint),
            ("status", &self.status),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.clone().map(|v| (name.to_owned(), v)))
        .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("cannot connect to Redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error("{0}")]
    Query(String),
}

/// Runs `aggregator usage`; the output goes to `out`.
pub async fn usage(
    config: &Config,
    args: &UsageArgs,
    out: &mut impl std::io::Write,
) -> Result<(), UsageError> {
    let redis_error = |source| UsageError::Redis {
        url: config.redis_url.clone(),
        source,
    };
    // Only reads, so no eviction-policy check (`shared::redis_policy`): an evicting Redis
    // cannot make this command count anything twice, and the servers refuse to run on one.
    let client = redis::Client::open(config.redis_url.as_str()).map_err(redis_error)?;
    let conn = redis::aio::ConnectionManager::new(client)
        .await
        .map_err(redis_error)?;
    // One query: nothing to cache.
    let cells = crate::cells::CellReader::new(
        &config.redis_url,
        config.keyspace.clone(),
        conn,
        0,
        Default::default(),
    )
    .map_err(redis_error)?;
    let now = chrono::Utc::now().timestamp_millis();
    let answer = crate::api::answer(&cells, &args.params(), Kind::Usage, now)
        .await
        .map_err(|e| UsageError::Query(e.to_string()))?;
    let document = serde_json::to_value(&answer)
        .map_err(|e| UsageError::Query(format!("cannot render the answer: {e}")))?;
    let text = if args.json {
        format!("{document:#}\n")
    } else {
        table(&document)
    };
    out.write_all(text.as_bytes())
        .map_err(|e| UsageError::Query(format!("cannot write output: {e}")))
}

const METRICS: [(&str, &str); 8] = [
    ("requests", "requests"),
    ("errors", "errors"),
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_creation_input_tokens", "cache_write"),
    ("cache_read_input_tokens", "cache_read"),
    ("cost_usd", "cost_usd"),
    ("unpriced_requests", "unpriced"),
];

/// The rows of a `/v1/usage` document as an aligned table: text columns left-aligned, numbers
/// right-aligned, then a total line.
pub fn table(document: &Value) -> String {
    let rows = document["rows"].as_array().cloned().unwrap_or_default();
    let mut labels: Vec<&str> = Vec::new();
    for name in [
        "bucket_start",
        "key",
        "key_name",
        "model",
        "account",
        "provider",
        "endpoint",
        "status",
    ] {
        if rows.iter().any(|r| r.get(name).is_some()) {
            labels.push(name);
        }
    }
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut lines: Vec<Vec<String>> = vec![
        labels
            .iter()
            .map(|l| (*l).to_owned())
            .chain(METRICS.iter().map(|(_, h)| (*h).to_owned()))
            .collect(),
    ];
    for row in &rows {
        lines.push(
            labels
                .iter()
                .map(|l| cell(&row[*l]))
                .chain(METRICS.iter().map(|(f, _)| cell(&row[*f])))
                .collect(),
        );
    }
    let mut total = vec![String::new(); labels.len()];
    if let Some(first) = total.first_mut() {
        *first = "total".to_owned();
    }
    for (field, _) in METRICS {
        let sum: rust_decimal::Decimal = rows
            .iter()
            .filter_map(|r| match &r[field] {
                Value::String(s) => s.parse().ok(),
                Value::Number(n) => n.as_i64().map(rust_decimal::Decimal::from),
                _ => None,
            })
            .sum();
        total.push(sum.normalize().to_string());
    }
    // Ungrouped, the one row is the total.
    if !labels.is_empty() {
        lines.push(total);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = format!(
        "from {} to {}, {} rows\n",
        cell(&document["from"]),
        cell(&document["to"]),
        rows.len()
    );
    for line in &lines {
        let fields: Vec<String> = line
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c < labels.len() {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        text.push_str(fields.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_columns_and_totals_them() {
        let document = serde_json::json!({
            "from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z",
            "rows": [
                {"model": "claude-sonnet-4-5", "requests": 12, "errors": 1, "input_tokens": 100,
                 "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                 "cost_usd": "0.000375", "unpriced_requests": 0},
                {"model": "gpt-4o", "requests": 3, "errors": 0, "input_tokens": 7,
                 "output_tokens": 2000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 9,
                 "cost_usd": "0.02", "unpriced_requests": 0}
            ]
        });
        let text = table(&document);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "from 2026-01-01T00:00:00Z to 2026-01-02T00:00:00Z, 2 rows"
        );
        assert!(
            lines[1].starts_with("model              requests  errors"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("claude-sonnet-4-5        12       1"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("total                    15       1"),
            "{text}"
        );
        assert!(lines[4].ends_with("0.020375         0"), "{text}");
        let widths: Vec<usize> = lines[1..].iter().map(|l| l.len()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{text}");
    }
}
